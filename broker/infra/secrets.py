"""Secrets that keybroker issues: random, shown once, stored as a SHA-256 digest."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

# 32 random bytes, URL-safe base64: 43 characters after the prefix.
SECRET_BYTES = 32
DISPLAY_CHARS = 8


@dataclass(frozen=True)
class IssuedSecret:
    plaintext: str
    digest: str
    display_prefix: str


def secret_digest(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def secret_issue(prefix: str) -> IssuedSecret:
    """A new ``{prefix}_…`` secret; only the digest and a short display prefix are kept."""
    plaintext = f"{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return IssuedSecret(
        plaintext=plaintext,
        digest=secret_digest(plaintext),
        display_prefix=plaintext[: len(prefix) + 1 + DISPLAY_CHARS],
    )
