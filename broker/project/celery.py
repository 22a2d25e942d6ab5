"""The Celery application; the beat schedule lives in settings (CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.project.settings")

app = Celery("broker")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def _heartbeat_on_start(**_: object) -> None:
    # /ready should see a fresh worker at once, not after the first beat interval.
    from broker.runtime.health import worker_heartbeat_record

    worker_heartbeat_record()
