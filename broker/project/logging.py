"""A last line of defence: log records never carry a credential, whatever a caller passes."""

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
