"""An optional copy of every audit event, sent to syslog as it is written.

``KEYBROKER_AUDIT_SYSLOG=udp://siem.example.com:514`` (or ``tcp://``) turns it on: each
committed event goes out as one RFC 5424 message whose text is the event's JSON, chain hash
included, so the SIEM holds a copy of the chain the database cannot rewrite.

It never holds up a writer: events go into a bounded in-process queue that a background
thread sends. A full queue drops the copy (the row is in the database; ``audit export``
sends it again) and counts it; a send that fails is counted and logged once a minute at
most. Nothing here can fail or delay the write of the row itself.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC
from logging.handlers import SysLogHandler
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

from audit.export import jsonl_line
from audit.models import AuditEvent

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000
APP_NAME = "keybroker"
# Actions a SIEM should not file with the routine ones.
NOTICE_ACTIONS = frozenset({"auth.failed", "policy.denied", "backend.invalid"})
FAILURE_LOG_SECONDS = 60.0


@dataclass
class SinkStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0


def syslog_target(url: str) -> tuple[str, int, socket.SocketKind]:
    """``udp://host:514`` or ``tcp://host:514`` as an address and a socket type; ValueError
    naming the accepted form otherwise."""
    parts = urlsplit(url)
    kinds = {"udp": socket.SOCK_DGRAM, "tcp": socket.SOCK_STREAM}
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in kinds or not parts.hostname or port is None:
        raise ValueError(f"{url!r} is not a syslog target; use udp://HOST:PORT or tcp://HOST:PORT")
    return parts.hostname, port, kinds[parts.scheme]


def syslog_line(event: AuditEvent) -> str:
    """The RFC 5424 message after its PRI: version, time, host, app, process, message id
    (the action), no structured data, and the event as JSON."""
    stamp = event.created_at.astimezone(UTC).isoformat(timespec="microseconds")
    body = jsonl_line(event)
    host = socket.gethostname() or "-"
    return (
        f"1 {stamp.replace('+00:00', 'Z')} {host} {APP_NAME} {os.getpid()} {event.action} - {body}"
    )


class _Handler(SysLogHandler):
    """Counts a failed send instead of printing a traceback to stderr."""

    def __init__(self, stats: SinkStats, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = stats
        self.last_failure_log = 0.0
        self.append_nul = False  # TCP frames end with a newline (RFC 6587), added below

    def handleError(self, record: logging.LogRecord) -> None:
        self.stats.failed += 1
        now = time.monotonic()
        if now - self.last_failure_log >= FAILURE_LOG_SECONDS:
            self.last_failure_log = now
            logger.warning("audit syslog sink: sending failed (%d so far)", self.stats.failed)
        if self.socktype == socket.SOCK_STREAM:
            # A dropped TCP connection is opened again at the next event.
            self.close_socket()

    def close_socket(self) -> None:
        held: socket.socket | None = getattr(self, "socket", None)
        if held is not None:
            held.close()
            self.socket = None


class _Sink:
    def __init__(self, target: str) -> None:
        self.target = target
        self.host, self.port, self.kind = syslog_target(target)
        self.queue: queue.Queue[tuple[str, int]] = queue.Queue(QUEUE_LIMIT)
        self.stats = SinkStats()
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self.thread.start()

    def put(self, line: str, level: int) -> None:
        try:
            self.queue.put_nowait((line, level))
        except queue.Full:
            self.stats.dropped += 1

    def _handler(self) -> _Handler | None:
        try:
            return _Handler(
                self.stats,
                address=(self.host, self.port),
                facility=SysLogHandler.LOG_AUTHPRIV,
                socktype=self.kind,
            )
        except OSError:
            return None  # TCP peer away: counted below, tried again at the next event

    def _run(self) -> None:
        handler: _Handler | None = None
        while True:
            line, level = self.queue.get()
            if handler is None or (
                getattr(handler, "socket", None) is None and self.kind == socket.SOCK_STREAM
            ):
                if handler is not None:
                    handler.close()
                handler = self._handler()
            if handler is None:
                self.stats.failed += 1
                continue
            record = logging.LogRecord("audit", level, "", 0, line, None, None)
            if self.kind == socket.SOCK_STREAM:
                record.msg = line + "\n"
            failed = self.stats.failed
            handler.emit(record)
            if self.stats.failed == failed:
                self.stats.sent += 1


_lock = threading.Lock()
_sink: _Sink | None = None


def _current() -> _Sink | None:
    global _sink
    target = getattr(settings, "AUDIT_SYSLOG", "")
    if not target:
        return None
    with _lock:
        if _sink is None or _sink.target != target or _sink.pid != os.getpid():
            _sink = _Sink(target)  # a forked worker starts its own thread
        return _sink


def audit_sink_send(events: list[AuditEvent]) -> None:
    """Queue a copy of committed events for the sink, if one is set; returns at once."""
    sink = _current() if events else None
    if sink is None:
        return
    for event in events:
        try:
            line = syslog_line(event)
        except Exception:  # a copy must never break the writer; the row is stored
            sink.stats.failed += 1
            continue
        level = logging.WARNING if event.action in NOTICE_ACTIONS else logging.INFO
        sink.put(line, level)


def audit_sink_stats() -> SinkStats:
    sink = _sink
    return sink.stats if sink is not None else SinkStats()
