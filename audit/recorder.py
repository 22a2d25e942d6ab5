"""Audit events written off the request path: the proxy queues, a background task writes.

Events wait in a bounded in-process buffer and are written in batches. When the database
is down they stay queued and are retried; when the buffer is full they are appended to a
spill file in the data directory (and a log line and a counter say so) rather than lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from audit.models import ActorType, AuditEvent
from broker.db import db_call
from broker.logging import redact

logger = logging.getLogger(__name__)

BUFFER_LIMIT = 50_000
BATCH_SIZE = 500
FLUSH_INTERVAL_SECONDS = 0.2


@dataclass
class RecorderStats:
    written: int = 0
    spilled: int = 0
    write_failures: int = 0


@dataclass
class _Recorder:
    pending: deque[AuditEvent] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    stats: RecorderStats = field(default_factory=RecorderStats)


_recorders: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Recorder] = (
    weakref.WeakKeyDictionary()
)


def _recorder() -> _Recorder:
    loop = asyncio.get_running_loop()
    recorder = _recorders.get(loop)
    if recorder is None:
        recorder = _recorders[loop] = _Recorder()
    if recorder.task is None or recorder.task.done():
        recorder.task = loop.create_task(_flush_forever(recorder), name="audit-recorder")
    return recorder


def audit_enqueue(
    *,
    action: str,
    agent: str = "",
    backend: str = "",
    message: str = "",
    address: str | None = None,
    **detail: Any,
) -> None:
    """Queue an agent's event; returns at once. Call from the event loop only."""
    recorder = _recorder()
    event = AuditEvent(
        action=action,
        actor_type=ActorType.AGENT if agent else ActorType.SYSTEM,
        actor=agent,
        agent=agent,
        backend=backend,
        client_address=address or None,
        message=redact(message)[:500],
        detail=detail,
    )
    if len(recorder.pending) >= BUFFER_LIMIT:
        _spill([event], recorder.stats)
        return
    recorder.pending.append(event)
    if len(recorder.pending) >= BATCH_SIZE:
        recorder.wake.set()


def _write(batch: list[AuditEvent]) -> None:
    AuditEvent.objects.bulk_create(batch)


_write_async = db_call(_write)


def _spill(events: list[AuditEvent], stats: RecorderStats) -> None:
    path = settings.DATA_DIR / "audit-spill.jsonl"
    with path.open("a") as spill:
        for event in events:
            row = {
                "action": event.action,
                "actor_type": event.actor_type,
                "actor": event.actor,
                "agent": event.agent,
                "backend": event.backend,
                "client_address": event.client_address,
                "message": event.message,
                "detail": event.detail,
            }
            spill.write(json.dumps(row) + "\n")
    stats.spilled += len(events)
    logger.error("audit buffer full: %d event(s) spilled to %s", len(events), path)


async def _flush_once(recorder: _Recorder) -> None:
    while recorder.pending:
        batch = [recorder.pending.popleft() for _ in range(min(BATCH_SIZE, len(recorder.pending)))]
        try:
            await _write_async(batch)
        except Exception:
            # Database down, a lost connection, a bad row: keep the batch and retry later.
            recorder.pending.extendleft(reversed(batch))
            recorder.stats.write_failures += 1
            logger.exception(
                "audit write failed; %d event(s) wait for a retry", len(recorder.pending)
            )
            raise
        recorder.stats.written += len(batch)


async def _flush_forever(recorder: _Recorder) -> None:
    backoff = FLUSH_INTERVAL_SECONDS
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recorder.wake.wait(), timeout=backoff)
        recorder.wake.clear()
        try:
            await _flush_once(recorder)
            backoff = FLUSH_INTERVAL_SECONDS
        except Exception:
            backoff = min(backoff * 2, 5.0)


async def audit_flush() -> None:
    """Write everything queued in this event loop now (tests, shutdown)."""
    recorder = _recorders.get(asyncio.get_running_loop())
    if recorder is not None:
        await _flush_once(recorder)


def audit_recorder_stats() -> RecorderStats:
    recorder = _recorders.get(asyncio.get_running_loop())
    return recorder.stats if recorder is not None else RecorderStats()


def audit_backlog() -> int:
    """Events queued in every event loop of this process and not yet written."""
    return sum(len(recorder.pending) for recorder in list(_recorders.values()))
