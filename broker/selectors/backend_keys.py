"""A backend's key pool as the API, the admin, the CLI and the proxy read it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import redis
from django.db.models import Count
from django.utils import timezone

from audit.models import AuditEvent
from broker.infra.errors import NotFound
from broker.infra.redis import redis_client, redis_key
from broker.models import Backend, BackendKey, ValidationState


def keys_of(backend: Backend) -> list[BackendKey]:
    """Every key of the pool, in order, disabled ones too."""
    return list(BackendKey.objects.filter(backend=backend))


def keys_enabled(backend: Backend) -> list[BackendKey]:
    """The keys calls may go out with, in order."""
    return list(BackendKey.objects.filter(backend=backend, enabled=True))


# A key's state for monitoring: its validation state while enabled, else "disabled".
KEY_STATES = (*ValidationState.values, "disabled")


def keys_by_state() -> dict[tuple[str, str], int]:
    """How many keys each backend has in each state of KEY_STATES, 0 included (so an alert
    on invalid keys sees its series from the start). Two small queries: /metrics asks."""
    counts = {
        (name, state): 0
        for name in Backend.objects.values_list("name", flat=True)
        for state in KEY_STATES
    }
    groups = (
        BackendKey.objects.order_by()
        .values_list("backend__name", "enabled", "validation_state")
        .annotate(count=Count("pk"))
    )
    for backend, enabled, state, count in groups:
        key = (backend, state if enabled else "disabled")
        counts[key] = counts.get(key, 0) + count
    return counts


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


def key_error_name(backend: str, fingerprint: str) -> str:
    """The Redis key of the last answer that set a pool key aside ("429 at 2026-…"), kept a
    day; written by the proxy only when it cools the key, so calls cost nothing more."""
    return redis_key("keyerr", backend, fingerprint)


LAST_ERROR_SECONDS = 24 * 3600


@dataclass(frozen=True)
class KeyHealth:
    """What the proxy last learnt of a key: healthy, or cooling down until ``until``; and
    the last answer that set it aside, within a day."""

    state: str  # "ok", "cooling" or "unknown" (Redis unreadable)
    until: float | None = None
    last_error: str = ""

    def describe(self, now: float | None = None) -> str:
        if self.state != "cooling" or self.until is None:
            return self.state
        return f"cooling ({max(0, round(self.until - (now or time.time())))}s)"


def keys_health(backend: Backend, keys: list[BackendKey]) -> dict[int, KeyHealth]:
    """Each key's health by id, from the cooldowns every proxy process shares."""
    if not keys:
        return {}
    names = [key_cooldown_name(backend.name, k.fingerprint) for k in keys]
    names += [key_error_name(backend.name, k.fingerprint) for k in keys]
    try:
        values = redis_client().mget(names)
    except (redis.RedisError, OSError):
        return {key.pk: KeyHealth("unknown") for key in keys}
    ends, errors = values[: len(keys)], values[len(keys) :]
    now = time.time()
    health = {}
    for key, end, error in zip(keys, ends, errors, strict=True):
        until = float(end) if end is not None else None
        last_error = error.decode() if isinstance(error, bytes) else (error or "")
        if until is not None and until > now:
            health[key.pk] = KeyHealth("cooling", until, last_error)
        else:
            health[key.pk] = KeyHealth("ok", None, last_error)
    return health


CALLS_WINDOW = timedelta(hours=24)


def keys_calls(backend: Backend) -> dict[str, int]:
    """Calls each key served in the last 24 hours, by fingerprint, from the audit trail."""
    rows = (
        AuditEvent.objects.filter(
            action="proxy.request",
            backend=backend.name,
            created_at__gte=timezone.now() - CALLS_WINDOW,
        )
        .values("detail__key_fingerprint")
        .annotate(calls=Count("id"))
    )
    return {
        row["detail__key_fingerprint"]: row["calls"]
        for row in rows
        if row["detail__key_fingerprint"]
    }


@dataclass(frozen=True)
class BrokenBackend:
    """An enabled backend whose last validation found no working key, and what to do."""

    backend: Backend
    problem: str
    fix: str


def backends_not_working() -> list[BrokenBackend]:
    """Enabled backends whose last validation found their key invalid (calls to them fail)
    or could not reach the upstream, with the fix for each: the admin index shows them."""
    broken = Backend.objects.filter(
        enabled=True,
        validation_state__in=[ValidationState.INVALID, ValidationState.UNREACHABLE],
    ).order_by("validation_state", "name")
    found = []
    for backend in broken:
        if backend.validation_state == ValidationState.INVALID:
            problem = "refused by the upstream: every call to it fails"
            fix = (
                "check its workload identity settings on its page"
                if backend.federated
                else f"enter a new key on its page (or `manage.py backend rotate {backend.name}`)"
            )
        else:
            problem = "the upstream could not be reached at the last check"
            fix = (
                "check its base URL and the network, then validate it again "
                f"(`manage.py backend validate {backend.name}`)"
            )
        found.append(BrokenBackend(backend, problem, fix))
    return found
