from __future__ import annotations

from celery import shared_task

from broker.health import worker_heartbeat_record


@shared_task(ignore_result=True)
def heartbeat() -> None:
    """Proves end to end that beat schedules, Redis carries and a worker runs tasks."""
    worker_heartbeat_record()
