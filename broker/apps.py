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
        from broker.prices import price_tables

        # A price table that cannot be read stops every process at once, naming the file,
        # rather than the first proxied call's audit event.
        price_tables()
