"""keybroker's agent side, Django-free: the ``keybroker`` CLI and what it shares with the server.

``keybroker.Credentials`` and ``keybroker.AsyncCredentials`` (keybroker/credentials.py) are
credentials providers for the official anthropic SDK; they load on first use, so the server,
which imports ``keybroker.wire``, never loads the agent's CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from keybroker.credentials import AsyncCredentials, Credentials, CredentialsError

__all__ = ["AsyncCredentials", "Credentials", "CredentialsError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("AsyncCredentials", "Credentials", "CredentialsError"):
        from keybroker import credentials

        return getattr(credentials, name)
    raise AttributeError(f"module 'keybroker' has no attribute {name!r}")
