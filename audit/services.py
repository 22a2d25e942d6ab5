"""The one way anything records an audit event."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from audit.models import ActorType, AuditEvent
from broker.logging import redact

if TYPE_CHECKING:
    from broker.models import Agent


def actor_of(user: AbstractBaseUser | AnonymousUser | None) -> tuple[str, str]:
    if user is None or not user.is_authenticated:
        return ActorType.SYSTEM, ""
    return ActorType.ADMIN, user.get_username()


def audit_record(
    *,
    action: str,
    by: AbstractBaseUser | AnonymousUser | None = None,
    agent: Agent | None = None,
    backend: str = "",
    message: str = "",
    address: str | None = None,
    **detail: Any,
) -> AuditEvent:
    """Record one event. ``by`` is the admin who acted; without one, ``agent`` is the actor."""
    actor_type, actor = actor_of(by)
    if actor_type == ActorType.SYSTEM and agent is not None:
        actor_type, actor = ActorType.AGENT, agent.name
    return AuditEvent.objects.create(
        action=action,
        actor_type=actor_type,
        actor=actor,
        agent=agent.name if agent is not None else "",
        backend=backend,
        client_address=address or None,
        # Messages may quote an upstream; keep credentials out whatever it says.
        message=redact(message)[:500],
        detail=detail,
    )
