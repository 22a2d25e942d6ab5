"""The Celery application; the beat schedule lives in settings (CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import worker_ready

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


# On the loggers themselves, not on handlers: Celery replaces the root logger's handlers
# when a worker starts.
for _name in TASK_LOGGERS:
    logging.getLogger(_name).addFilter(RoutineTaskFilter(ROUTINE_TASKS))
