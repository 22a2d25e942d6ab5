"""Liveness and readiness: what /health and /ready report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection

from broker.infra.redis import redis_client, redis_key

logger = logging.getLogger(__name__)

HEARTBEAT_KEY = ("worker", "heartbeat")


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


def worker_heartbeat_record() -> None:
    redis_client().set(redis_key(*HEARTBEAT_KEY), f"{time.time():.3f}", ex=3600)


def check_database() -> Check:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        logger.warning("readiness: database unavailable: %s", type(exc).__name__)
        return Check(False, f"unavailable ({type(exc).__name__})")
    return Check(True, connection.vendor)


def check_redis() -> Check:
    try:
        redis_client().ping()
    except Exception as exc:
        logger.warning("readiness: redis unavailable: %s", type(exc).__name__)
        return Check(False, f"unavailable ({type(exc).__name__})")
    return Check(True, "embedded" if settings.REDIS_EMBEDDED else "external")


def check_worker() -> Check:
    try:
        raw = redis_client().get(redis_key(*HEARTBEAT_KEY))
    except Exception as exc:
        return Check(False, f"unknown: redis unavailable ({type(exc).__name__})")
    if raw is None:
        return Check(False, "no heartbeat from any Celery worker yet")
    age = time.time() - float(raw)
    if age > settings.HEARTBEAT_MAX_AGE_SECONDS:
        return Check(False, f"last heartbeat {age:.0f}s ago")
    return Check(True, f"last heartbeat {age:.0f}s ago")


def readiness() -> dict[str, Check]:
    return {"database": check_database(), "redis": check_redis(), "worker": check_worker()}


def health_counts() -> dict[str, int]:
    from broker.models import Backend

    return {
        "admins": get_user_model().objects.filter(is_staff=True, is_active=True).count(),
        "backends": Backend.objects.count(),
    }


def backend_states() -> dict[str, dict[str, Any]]:
    """Each enabled backend's last validation, for /ready's details (it never fails /ready:
    one bad upstream key must not take every keybroker instance out of the load balancer).
    A backend with a pool of several keys lists each key's state and health too."""
    from broker.models import Backend
    from broker.selectors.backend_keys import KeyHealth, keys_health

    try:
        states: dict[str, dict[str, Any]] = {}
        for backend in Backend.objects.filter(enabled=True).prefetch_related("keys"):
            states[backend.name] = {
                "state": backend.validation_state,
                "detail": backend.validation_message,
            }
            keys = list(backend.keys.all())
            if len(keys) > 1:
                health = keys_health(backend, keys)
                states[backend.name]["keys"] = {
                    key.fingerprint: {
                        "state": key.validation_state,
                        "enabled": key.enabled,
                        "health": health.get(key.pk, KeyHealth("ok")).describe(),
                    }
                    for key in keys
                }
        return states
    except Exception:
        return {}


def audit_state() -> dict[str, int | bool]:
    """This process's queued audit events and whether a spill file waits to be replayed:
    informational, for alerting; it never fails /ready."""
    from audit.recorder import SPILL_FILE, audit_backlog

    spill = settings.DATA_DIR / SPILL_FILE
    return {
        "queued": audit_backlog(),
        "spill_waiting": spill.exists() and spill.stat().st_size > 0,
    }
