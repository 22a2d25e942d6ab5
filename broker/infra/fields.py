"""Encryption at rest for upstream secrets, with django-cryptography-5.

The library encrypts with CRYPTOGRAPHY_KEY but signs with SECRET_KEY, which would tie every
stored credential to the session-signing key. Here both halves derive from
KEYBROKER_ENCRYPTION_KEY alone, so the two keys rotate independently.
"""

from __future__ import annotations

import functools
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import models
from django_cryptography.core.signing import FernetSigner
from django_cryptography.fields import EncryptedMixin
from django_cryptography.utils.crypto import FernetBytes


def _derive(key: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(key.encode())


def secret_box_for(key: str) -> FernetBytes:
    """AES-256-CBC + HMAC-SHA256 (django-cryptography's Fernet) keyed by ``key`` alone."""
    return FernetBytes(
        key=_derive(key, b"keybroker/secret-encryption"),
        signer=FernetSigner(key=_derive(key, b"keybroker/secret-signature")),
    )


@functools.cache
def _box_for(key: str) -> FernetBytes:
    return secret_box_for(key)


def secret_box() -> FernetBytes:
    return _box_for(settings.ENCRYPTION_KEY)


class EncryptedTextField(EncryptedMixin, models.TextField):  # type: ignore[type-arg]
    """A TextField stored encrypted; the column holds ciphertext only."""

    base_class = models.TextField
    wasinstance = True

    @property
    def _fernet(self) -> FernetBytes:
        # Looked up per use, so tests and key rotation see the key in force now.
        return secret_box()

    @_fernet.setter
    def _fernet(self, value: object) -> None:
        """The library assigns its own box in __init__; ours is derived on use instead."""

    def deconstruct(self) -> tuple[str, str, list[Any], dict[str, Any]]:
        name, _, args, kwargs = models.TextField.deconstruct(self)
        return name, "broker.infra.fields.EncryptedTextField", list(args), kwargs
