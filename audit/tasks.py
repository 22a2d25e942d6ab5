"""Celery entry points of the audit trail: retention, and alerts (issue 17)."""

from __future__ import annotations

from typing import Any

import redis
from celery import shared_task
from django.db import DatabaseError

from audit.alerts import SPILLED_TASK, spilled_alert
from audit.notify import DELIVER_TASK, deliveries_create, deliveries_requeue, delivery_attempt
from audit.rollups import usage_rollup
from audit.services import audit_prune
from audit.spikes import spikes_check
from broker.infra.redis import redis_client, redis_key

# One audit.spilled alert per this many seconds, whichever process spilled.
SPILLED_ALERT_SECONDS = 300


@shared_task(ignore_result=True)
def audit_prune_task() -> None:
    """Retention: beat runs it hourly; rows older than KEYBROKER_AUDIT_RETENTION_DAYS go."""
    audit_prune()


@shared_task(ignore_result=True)
def usage_rollup_task() -> None:
    """Beat runs it every USAGE_ROLLUP_INTERVAL_SECONDS: the new proxied calls into the
    rollups. Two at once count nothing twice (audit/rollups.py)."""
    usage_rollup()


@shared_task(name=DELIVER_TASK, bind=True, ignore_result=True, max_retries=None)
def notification_deliver_task(self: Any, delivery_id: str) -> None:
    """One try of a delivery; the next, if any, after its backoff (KEYBROKER_ALERT_*)."""
    wait = delivery_attempt(delivery_id=delivery_id)
    if wait is not None:
        raise self.retry(countdown=wait)


@shared_task(ignore_result=True)
def notification_requeue_task() -> None:
    """Beat, every 5 minutes: deliveries whose task was lost are queued again."""
    deliveries_requeue()


@shared_task(ignore_result=True)
def alerts_spike_task() -> None:
    """Beat, every 10 minutes: agents whose last hour is far above their own baseline."""
    spikes_check()


@shared_task(
    name=SPILLED_TASK,
    bind=True,
    ignore_result=True,
    # The database is what failed: wait for it, up to about an hour.
    autoretry_for=(DatabaseError,),
    retry_backoff=5,
    retry_backoff_max=600,
    max_retries=12,
)
def alerts_spilled_task(self: Any, count: int, reason: str, path: str) -> None:
    if self.request.retries == 0:
        try:
            first = redis_client().set(
                redis_key("alerts", "spilled"), "1", nx=True, ex=SPILLED_ALERT_SECONDS
            )
        except (redis.RedisError, OSError):
            first = True
        if not first:
            return
    deliveries_create(spilled_alert(count=count, reason=reason, path=path))
