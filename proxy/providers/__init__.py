"""What differs between upstream providers on the wire (issue 16), one module each: the
shape of keybroker's own error answers, the headers a call needs beside its credential,
which calls are metered, which body fields ask for output tokens, and how usage is read
out of answers and streams.

A backend's kind names its provider in broker/kinds.py, whose ``dialect`` picks one of the
``Wire``s registered here; everything else in the proxy is the same for every provider.
Adding one is docs/providers.md.
"""

from __future__ import annotations

from broker.kinds import ProviderError, provider_for
from proxy.providers.anthropic import ANTHROPIC
from proxy.providers.base import Usage, Wire
from proxy.providers.openai import OPENAI

WIRES: dict[str, Wire] = {wire.dialect: wire for wire in (ANTHROPIC, OPENAI)}


def wire_for(kind: str) -> Wire:
    """The wire of a backend kind; Anthropic's for a kind nobody knows."""
    try:
        return WIRES[provider_for(kind).dialect]
    except (ProviderError, KeyError):
        return ANTHROPIC


__all__ = ["ANTHROPIC", "OPENAI", "WIRES", "Usage", "Wire", "wire_for"]
