"""Celery entry points of the audit trail."""

from __future__ import annotations

from celery import shared_task

from audit.services import audit_prune


@shared_task(ignore_result=True)
def audit_prune_task() -> None:
    """Retention: beat runs it hourly; rows older than KEYBROKER_AUDIT_RETENTION_DAYS go."""
    audit_prune()
