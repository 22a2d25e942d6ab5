"""The audit trail's writes: recording an event from sync code, and retention.

Two doors, one row shape (audit/events.py): ``audit_record`` here, for the broker's
services, Celery tasks and commands, writes in the caller's transaction and publishes to
the live feed once it commits; ``audit_enqueue`` (audit/recorder.py), for the proxy's event
loop, queues and writes off the request path.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.utils import timezone

from audit.alerts import ALERTED_ACTIONS, alerts_dispatch
from audit.chain import chain_prune, chain_write
from audit.events import RECORD_COLUMNS, event_row
from audit.models import ActorType, AuditEvent
from audit.publish import audit_publish

if TYPE_CHECKING:
    from broker.models import Agent

logger = logging.getLogger(__name__)

PRUNE_CHUNK = 5000


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
    """Record one event. ``by`` is the admin who acted; without one, ``agent`` is the actor.

    ``token_id`` and ``token`` (a display prefix) become columns; other keywords are kept
    in ``detail``. The row is part of the caller's transaction: an action that rolls back
    leaves no event, and the live feed hears of it only once it commits.
    """
    actor_type, actor = actor_of(by)
    if actor_type == ActorType.SYSTEM and agent is not None:
        actor_type, actor = ActorType.AGENT, agent.name
    row = event_row(
        created_at=timezone.now(),
        action=action,
        actor_type=actor_type,
        actor=actor,
        agent=agent.name if agent is not None else "",
        agent_id=str(agent.pk) if agent is not None else None,
        backend=backend,
        address=address,
        message=message,
        fields=detail,
        columns=RECORD_COLUMNS,
    )
    (event,) = chain_write([row])
    transaction.on_commit(lambda: audit_publish([event]))
    if action in ALERTED_ACTIONS:
        transaction.on_commit(lambda: alerts_dispatch([event]))
    return event


def audit_prune(*, now: datetime | None = None, days: int | None = None) -> int:
    """Delete events older than the retention window; returns how many went.

    Whole segments from the start of the hash chain (audit/chain.py), with a checkpoint
    recorded first so verification still holds; in chunks, each its own statement, so a
    first run over a large table neither holds one huge transaction nor locks the table
    against the recorder's writes for long.
    """
    days = settings.AUDIT_RETENTION_DAYS if days is None else days
    cutoff = (now or timezone.now()) - timedelta(days=days)
    deleted = chain_prune(cutoff=cutoff, chunk=PRUNE_CHUNK)
    if deleted:
        logger.info("audit retention: deleted %d event(s) older than %d days", deleted, days)
    return deleted
