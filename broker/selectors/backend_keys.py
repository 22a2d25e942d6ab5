"""A backend's key pool as the API, the admin, the CLI and the proxy read it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from broker.infra.errors import NotFound
from broker.infra.redis import redis_client, redis_key
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


def key_cooldown_name(backend: str, fingerprint: str) -> str:
    """The Redis key of a pool key's cooldown; its value is when it ends (epoch seconds),
    and it expires then. The proxy writes it (proxy/keys.py); the CLI, API and admin read it."""
    return redis_key("keycool", backend, fingerprint)


@dataclass(frozen=True)
class KeyHealth:
    """What the proxy last learnt of a key: healthy, or cooling down until ``until``."""

    state: str  # "ok", "cooling" or "unknown" (Redis unreadable)
    until: float | None = None

    def describe(self, now: float | None = None) -> str:
        if self.state != "cooling" or self.until is None:
            return self.state
        return f"cooling ({max(0, round(self.until - (now or time.time())))}s)"


def keys_health(backend: Backend, keys: list[BackendKey]) -> dict[int, KeyHealth]:
    """Each key's health by id, from the cooldowns every proxy process shares."""
    if not keys:
        return {}
    try:
        ends = redis_client().mget([key_cooldown_name(backend.name, k.fingerprint) for k in keys])
    except (redis.RedisError, OSError):
        return {key.pk: KeyHealth("unknown") for key in keys}
    now = time.time()
    health = {}
    for key, end in zip(keys, ends, strict=True):
        until = float(end) if end is not None else None
        cooling = until is not None and until > now
        health[key.pk] = KeyHealth("cooling", until) if cooling else KeyHealth("ok")
    return health
