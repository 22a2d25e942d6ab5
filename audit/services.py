"""The one way anything records an audit event."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from audit.models import ActorType, AuditEvent
from broker.logging import redact


def actor_of(user: AbstractBaseUser | AnonymousUser | None) -> tuple[str, str]:
    if user is None or not user.is_authenticated:
        return ActorType.SYSTEM, ""
    return ActorType.ADMIN, user.get_username()


def audit_record(
    *,
    action: str,
    by: AbstractBaseUser | AnonymousUser | None = None,
    backend: str = "",
    message: str = "",
    **detail: Any,
) -> AuditEvent:
    actor_type, actor = actor_of(by)
    return AuditEvent.objects.create(
        action=action,
        actor_type=actor_type,
        actor=actor,
        backend=backend,
        # Messages may quote an upstream; keep credentials out whatever it says.
        message=redact(message)[:500],
        detail=detail,
    )
