"""Which audit events are alerts, and sending them to the channels that want them (issue 17).

Alerts are driven by the audit trail, the one place where everything that happens is
written: ``audit_record`` (after its transaction commits) and the proxy's recorder (after
each batch is written) hand new events to ``alerts_dispatch``, which turns the few that
matter into an Alert and a delivery per subscribed channel (audit/notify.py). A service
that enrolls an agent or validates a key knows nothing of alerts.

The one alert with no event behind it is ``audit.spilled``: the recorder spills because the
database cannot take events, so it queues that alert to Celery directly (``alerts_spilled``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis
from celery import signature
from django.conf import settings
from django.urls import reverse

from audit.models import ActorType, AlertEvent, AuditEvent
from audit.notify import Alert, deliveries_create
from broker.infra.redis import redis_client, redis_key
from broker.models import Agent, AgentStatus, Backend

logger = logging.getLogger(__name__)

SPILLED_TASK = "audit.tasks.alerts_spilled_task"
# An invalid key is said once, and again a day later if it still is.
KEY_INVALID_REMINDER_SECONDS = 86_400
# A process that spills says so at most this often (the task dedupes across processes).
SPILL_ALERT_EVERY_SECONDS = 60.0


def _admin_url(path: str) -> str:
    return f"{settings.PUBLIC_URL}{path}"


def _agent_link(name: str) -> str:
    agent = Agent.objects.filter(name=name).exclude(status=AgentStatus.UNENROLLED).first()
    if agent is None:
        return _admin_url(reverse("admin:broker_agent_changelist"))
    return _admin_url(reverse("admin:broker_agent_change", args=[agent.pk]))


def _waiting(event: AuditEvent) -> Alert | None:
    if event.actor_type != ActorType.AGENT:
        return None  # an admin created it approved: nobody needs to act
    scopes = event.detail.get("scopes") or []
    return Alert(
        event=AlertEvent.AGENT_WAITING,
        text=f"Agent {event.agent} enrolled and waits for approval "
        f"(asks for {', '.join(scopes) or 'no backend'})",
        link=_agent_link(event.agent),
        data={"agent": event.agent, "scopes": scopes, "address": event.client_address},
    )


def _scopes_requested(event: AuditEvent) -> Alert:
    scopes = event.detail.get("scopes") or []
    return Alert(
        event=AlertEvent.SCOPES_REQUESTED,
        text=f"Agent {event.agent} asks for more scopes: {', '.join(scopes)}",
        link=_agent_link(event.agent),
        data={"agent": event.agent, "scopes": scopes},
    )


def _invalid_flag(event: AuditEvent) -> str:
    return redis_key("alerts", "key_invalid", event.backend, event.detail.get("fingerprint", ""))


def _key_invalid(event: AuditEvent) -> Alert | None:
    """Once per key until it validates again (or a day passes): the hourly validation of
    a key that stays invalid must not page anyone every hour."""
    try:
        first = redis_client().set(
            _invalid_flag(event), "1", nx=True, ex=KEY_INVALID_REMINDER_SECONDS
        )
    except (redis.RedisError, OSError):
        first = True  # better twice than never
    if not first:
        return None
    fingerprint = event.detail.get("fingerprint", "")
    backend = Backend.objects.filter(name=event.backend).first()
    link = _admin_url(
        reverse("admin:broker_backend_change", args=[backend.pk])
        if backend is not None
        else reverse("admin:broker_backend_changelist")
    )
    which = f"Key {fingerprint} of backend {event.backend}" if fingerprint else event.backend
    return Alert(
        event=AlertEvent.KEY_INVALID,
        text=f"{which} failed validation: {event.message}",
        link=link,
        data={"backend": event.backend, "fingerprint": fingerprint, "message": event.message},
    )


def _key_valid(event: AuditEvent) -> None:
    with contextlib.suppress(redis.RedisError, OSError):  # else the flag expires by itself
        redis_client().delete(_invalid_flag(event))


def _budget(event: AuditEvent) -> Alert:
    detail = event.detail
    percent = int(detail.get("percent", 0))
    return Alert(
        event=AlertEvent.BUDGET_100 if percent >= 100 else AlertEvent.BUDGET_80,
        text=f"Agent {event.agent} on {event.backend}: {event.message}",
        link=_agent_link(event.agent),
        data={"agent": event.agent, "backend": event.backend, **detail},
    )


def _spike(event: AuditEvent) -> Alert:
    return Alert(
        event=AlertEvent.SPIKE,
        text=f"Agent {event.agent}: {event.message}",
        link=_admin_url(f"{reverse('admin:audit_auditevent_changelist')}?agent={event.agent}"),
        data={"agent": event.agent, **event.detail},
    )


def _held(event: AuditEvent) -> Alert:
    """A call that waits for a person (issue 18): the activity page has its buttons."""
    detail = event.detail
    return Alert(
        event=AlertEvent.CALL_HELD,
        text=f"A call of agent {event.agent} to {event.backend} waits for approval: "
        f"{event.message}",
        link=_admin_url(reverse("activity")),
        data={
            "agent": event.agent,
            "backend": event.backend,
            "model": event.model,
            "path": event.path,
            "hold_id": detail.get("hold_id"),
            "rule": detail.get("hold_rule"),
            "held_until": detail.get("held_until"),
        },
    )


_ALERT_OF: dict[str, Callable[[AuditEvent], Alert | None]] = {
    "agent.enrolled": _waiting,
    "agent.scopes_requested": _scopes_requested,
    "backend.invalid": _key_invalid,
    "backend.validated": _key_valid,
    "budget.threshold": _budget,
    "agent.spike": _spike,
    "proxy.held": _held,
}
ALERTED_ACTIONS = frozenset(_ALERT_OF)


def alerts_dispatch(events: Iterable[AuditEvent]) -> int:
    """Queue the alerts among newly written ``events``; returns how many deliveries.

    Never raises: an alert that cannot be queued is logged, and whoever wrote the event
    (a request, the recorder) goes on.
    """
    queued = 0
    for event in events:
        convert = _ALERT_OF.get(event.action)
        if convert is None:
            continue
        try:
            alert = convert(event)
            if alert is not None:
                queued += len(deliveries_create(alert))
        except Exception:
            logger.exception("alert for audit event %s (%s) not queued", event.pk, event.action)
    return queued


# --- the recorder spilling -------------------------------------------------------------------
class _SpillNotice:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -SPILL_ALERT_EVERY_SECONDS

    def due(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._last < SPILL_ALERT_EVERY_SECONDS:
                return False
            self._last = now
            return True


_spill_notice = _SpillNotice()


def alerts_spilled(*, count: int, reason: str, path: str) -> None:
    """Queue the ``audit.spilled`` alert, from a thread: the recorder calls this on its event
    loop, and a Redis that is down too must not hold the loop while Celery gives up."""
    if not _spill_notice.due():
        return

    def send() -> None:
        try:
            signature(SPILLED_TASK, args=(count, reason, path)).apply_async(retry=False)
        except Exception as exc:
            logger.error("audit.spilled alert not queued (%s)", type(exc).__name__)

    # A daemon: a Redis that black-holes connections must not keep a stopping server up;
    # a spill at shutdown whose alert does not leave in time is still in the log.
    threading.Thread(target=send, name="audit-spill-alert", daemon=True).start()


def spilled_alert(*, count: int, reason: str, path: str) -> Alert:
    return Alert(
        event=AlertEvent.AUDIT_SPILLED,
        text=f"The audit recorder spilled {count} event(s) to {path} ({reason}); they are "
        "written into the database as soon as it takes writes again",
        link=_admin_url(reverse("admin:audit_auditevent_changelist")),
        data={"count": count, "reason": reason, "path": path},
    )
