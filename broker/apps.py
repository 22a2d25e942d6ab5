from __future__ import annotations

from django.apps import AppConfig


class BrokerConfig(AppConfig):
    name = "broker"
    verbose_name = "keybroker"

    def ready(self) -> None:
        # Importing the Celery app here (not in broker/__init__) binds @shared_task to it
        # in every Django process, while `broker` stays importable without Django for the
        # agent CLI.
        from broker import celery  # noqa: F401
