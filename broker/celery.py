"""The name ``celery -A broker`` finds; the app is configured in ``broker.project.celery``."""

from broker.project.celery import app

__all__ = ["app"]
