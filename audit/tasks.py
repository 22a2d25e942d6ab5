"""Celery entry points of the audit trail."""

from __future__ import annotations

from celery import shared_task

from audit.rollups import usage_rollup
from audit.services import audit_prune


@shared_task(ignore_result=True)
def audit_prune_task() -> None:
    """Retention: beat runs it hourly; rows older than KEYBROKER_AUDIT_RETENTION_DAYS go."""
    audit_prune()


@shared_task(ignore_result=True)
def usage_rollup_task() -> None:
    """Beat runs it every USAGE_ROLLUP_INTERVAL_SECONDS: the new proxied calls into the
    rollups. Two at once count nothing twice (audit/rollups.py)."""
    usage_rollup()
