"""The Celery application; the beat schedule lives in settings (CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, Task
from celery.signals import (
    task_failure,
    task_retry,
    task_success,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from broker.infra.metrics import CELERY_TASKS, metrics_process_exit
from broker.project.logging import RoutineTaskFilter

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.project.settings")

# Where Celery logs a task being sent (beat), received and done (the worker).
TASK_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace")
ROUTINE_TASKS = ("broker.tasks.heartbeat",)

app = Celery("broker")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def _heartbeat_on_start(**_: object) -> None:
    # /ready should see a fresh worker at once, not after the first beat interval.
    from broker.runtime.health import worker_heartbeat_record

    worker_heartbeat_record()


# Task outcomes for /metrics: each worker process writes them into the machine's
# PROMETHEUS_MULTIPROC_DIR, which the web processes there serve (docs/metrics.md).
@task_success.connect
def _count_success(sender: Task[Any, Any] | None = None, **_: object) -> None:
    CELERY_TASKS.labels(_task_name(sender), "success").inc()


@task_failure.connect
def _count_failure(sender: Task[Any, Any] | None = None, **_: object) -> None:
    CELERY_TASKS.labels(_task_name(sender), "failure").inc()


@task_retry.connect
def _count_retry(sender: Task[Any, Any] | None = None, **_: object) -> None:
    CELERY_TASKS.labels(_task_name(sender), "retry").inc()


def _task_name(task: Task[Any, Any] | None) -> str:
    return getattr(task, "name", None) or "unknown"


@worker_process_shutdown.connect
@worker_shutdown.connect
def _process_exit(**_: object) -> None:
    metrics_process_exit()


# On the loggers themselves, not on handlers: Celery replaces the root logger's handlers
# when a worker starts.
for _name in TASK_LOGGERS:
    logging.getLogger(_name).addFilter(RoutineTaskFilter(ROUTINE_TASKS))
