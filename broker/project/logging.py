"""Log filters: records never carry a credential, whatever a caller passes; routine lines
stay out of the way of the ones people read."""

from __future__ import annotations

import logging

from keybroker.wire import redact


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # Exception text is rendered later by the formatter; render and clean it now.
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(formatted)
        return True


class QuietReadinessFilter(logging.Filter):
    """A 503 from /ready is an answer for the load balancer, not a server error to log."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        return not (
            getattr(record, "status_code", None) == 503
            and getattr(request, "path", None) == "/ready"
        )


class RoutineTaskFilter(logging.Filter):
    """Celery's lines about a routine task (sent by beat, received, succeeded) at DEBUG.

    The worker's heartbeat runs every 10 s: at INFO its three lines each time buried
    everything else `serve` prints (issue 20, item 5). Other tasks keep their lines, and a
    heartbeat that fails still logs at ERROR.
    """

    def __init__(self, task_names: tuple[str, ...]) -> None:
        super().__init__()
        self.task_names = task_names

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        if not any(name in message for name in self.task_names):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
