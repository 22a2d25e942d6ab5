"""Celery entry points: take an id, fetch, return early if the row is gone, call a service."""

from __future__ import annotations

from celery import shared_task

from broker.models import Backend, BackendKey
from broker.runtime.health import worker_heartbeat_record
from broker.services.backends import VALIDATE_TASK, backend_validate
from broker.services.tokens import tokens_sweep


@shared_task(ignore_result=True)
def heartbeat() -> None:
    """Proves end to end that beat schedules, Redis carries and a worker runs tasks."""
    worker_heartbeat_record()


@shared_task(name=VALIDATE_TASK, ignore_result=True)
def backend_validate_task(backend_id: int, key_id: int | None = None) -> None:
    """Validate each enabled key of the backend, or only ``key_id`` when given."""
    backend = Backend.objects.filter(pk=backend_id).first()
    if backend is None:
        return
    if key_id is None:
        backend_validate(backend=backend)
        return
    key = BackendKey.objects.filter(pk=key_id, backend=backend).first()
    if key is not None:
        backend_validate(backend=backend, key=key)


@shared_task(ignore_result=True)
def backends_validate_all() -> None:
    for backend_id in Backend.objects.filter(enabled=True).values_list("pk", flat=True):
        backend_validate_task.delay(backend_id)


@shared_task(ignore_result=True)
def tokens_sweep_task() -> None:
    tokens_sweep()
