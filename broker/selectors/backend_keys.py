"""A backend's key pool as the API, the admin, the CLI and the proxy read it."""

from __future__ import annotations

from broker.infra.errors import NotFound
from broker.models import Backend, BackendKey


def keys_of(backend: Backend) -> list[BackendKey]:
    """Every key of the pool, in order, disabled ones too."""
    return list(BackendKey.objects.filter(backend=backend))


def keys_enabled(backend: Backend) -> list[BackendKey]:
    """The keys calls may go out with, in order."""
    return list(BackendKey.objects.filter(backend=backend, enabled=True))


def key_get(*, backend: Backend, fingerprint: str) -> BackendKey:
    """The key of ``backend`` named by its fingerprint (``sk-ant-api03-…AbCd``)."""
    key = BackendKey.objects.filter(backend=backend, fingerprint=fingerprint.strip()).first()
    if key is None:
        raise NotFound(f"backend {backend.name} has no key {fingerprint}", "fingerprint")
    return key
