"""Audit events written off the request path: the proxy queues, a background task writes.

The async door of the recorder (``audit_enqueue``; the sync one is ``audit_record`` in
audit/services.py). Each event loop has a bounded in-process buffer of plain rows that a
background task writes in batches (every 0.2 s, or at once when 500 are waiting), then
publishes to the live feed. Nothing is dropped silently:

- a failed write keeps the batch and retries with backoff (database down);
- a row the database refuses on its own (a constraint) is set aside in
  ``audit-rejected.jsonl`` so it cannot block the rows behind it;
- a full buffer (50,000 events) appends new events to ``audit-spill.jsonl``, and so does a
  shutdown that cannot write; the spill file is replayed into the database once writes
  succeed again.

Each of these bumps a counter (``audit_recorder_stats()``) and logs a line.
The choice of an in-process buffer over a Redis stream or a Celery task, with numbers, is in
docs/decisions.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DataError, IntegrityError
from django.utils import timezone

from audit.alerts import ALERTED_ACTIONS, alerts_dispatch, alerts_spilled
from audit.chain import chain_write
from audit.events import PROXY_COLUMNS, event_json, event_row
from audit.metrics import calls_observe
from audit.models import ActorType, AuditEvent
from audit.publish import audit_publish_payloads
from broker.infra.db import db_call
from broker.infra.loops import LoopLocal
from broker.infra.metrics import (
    AUDIT_QUEUE,
    AUDIT_REJECTED,
    AUDIT_REPLAYED,
    AUDIT_SPILLED,
    AUDIT_WRITE_FAILURES,
)

logger = logging.getLogger(__name__)

BUFFER_LIMIT = 50_000
BATCH_SIZE = 500
FLUSH_INTERVAL_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 5.0
# How often an idle recorder looks for a spill file another process may have left.
SPILL_CHECK_SECONDS = 10.0
# Publishes waiting on a slow channel layer; beyond this the feed skips batches (logged).
MAX_PUBLISHING = 32
SPILL_FILE = "audit-spill.jsonl"
REJECTED_FILE = "audit-rejected.jsonl"

Row = dict[str, Any]
Event = dict[str, Any]  # a written event in its JSON form (audit.events.event_json)


@dataclass
class RecorderStats:
    written: int = 0
    write_failures: int = 0
    spilled: int = 0
    replayed: int = 0
    rejected: int = 0
    published: int = 0
    publish_failures: int = 0


@dataclass
class _Recorder:
    pending: deque[Row] = field(default_factory=deque)
    in_flight: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    publishing: set[asyncio.Task[None]] = field(default_factory=set)
    stats: RecorderStats = field(default_factory=RecorderStats)
    next_spill_check: float = 0.0


_recorders = LoopLocal(_Recorder)


def _recorder() -> _Recorder:
    loop = asyncio.get_running_loop()
    recorder = _recorders.get()
    if recorder.task is None or recorder.task.done():
        recorder.task = loop.create_task(_flush_forever(recorder), name="audit-recorder")
    return recorder


def audit_enqueue(
    *,
    action: str,
    agent: str = "",
    agent_id: str | None = None,
    backend: str = "",
    message: str = "",
    address: str | None = None,
    **fields: Any,
) -> None:
    """Queue an agent's event; returns at once. Call from the event loop only.

    Proxied-call fields (method, path, model, status, token counts, ...) become columns;
    see audit/events.py. The time is taken now, not when the batch is written.
    """
    recorder = _recorder()
    row = event_row(
        created_at=timezone.now(),
        action=action,
        actor_type=ActorType.AGENT if agent else ActorType.SYSTEM,
        actor=agent,
        agent=agent,
        agent_id=agent_id,
        backend=backend,
        address=address,
        message=message,
        fields=fields,
        columns=PROXY_COLUMNS,
    )
    if len(recorder.pending) >= BUFFER_LIMIT:
        _spill([row], recorder.stats, reason="audit buffer full")
        return
    recorder.pending.append(row)
    if len(recorder.pending) >= BATCH_SIZE:
        recorder.wake.set()


# --- writing -----------------------------------------------------------------------------
class AuditWriteFailed(Exception):
    """A batch could not be written; its rows are back in the queue."""


def _write(batch: list[Row]) -> list[AuditEvent]:
    events = chain_write(batch)
    # Counted once written, in this thread: the metrics cost the event loop nothing.
    calls_observe(batch)
    return _alert(events)


def _alert(written: list[AuditEvent]) -> list[AuditEvent]:
    """Hand the few events that are alerts (a budget crossed) to the dispatcher; a batch
    of proxied calls alone costs one set lookup per event."""
    alerted = [event for event in written if event.action in ALERTED_ACTIONS]
    if alerted:
        alerts_dispatch(alerted)
    return written


def _write_one_by_one(batch: list[Row]) -> tuple[list[AuditEvent], list[Row], list[Row]]:
    """Find the rows the database refuses, so the rest of a batch still gets written.

    Returns what was written, what was refused, and what was not tried because the
    database went away meanwhile.
    """
    written: list[AuditEvent] = []
    written_rows: list[Row] = []
    refused: list[Row] = []
    rest: list[Row] = []
    for index, row in enumerate(batch):
        try:
            written.extend(chain_write([row]))
            written_rows.append(row)
        except (DataError, IntegrityError):
            refused.append(row)
        except Exception:
            rest = batch[index:]
            break
    calls_observe(written_rows)
    return _alert(written), refused, rest


def _write_described(batch: list[Row]) -> list[Event]:
    """Write a batch and describe what went in for the live feed, both in the writer's
    thread: building the feed's JSON on the event loop stalled every call in flight for a
    few milliseconds per batch (issue 13's p99), in the thread it takes turns with them."""
    return [event_json(event) for event in _write(batch)]


def _write_one_by_one_described(batch: list[Row]) -> tuple[list[Event], list[Row], list[Row]]:
    written, refused, rest = _write_one_by_one(batch)
    return [event_json(event) for event in written], refused, rest


_write_async = db_call(_write_described)
_write_one_by_one_async = db_call(_write_one_by_one_described)


async def _flush_once(recorder: _Recorder) -> int:
    """Write what is queued now; returns how many rows went in. Raises if writes fail.

    What arrives while it writes waits for the next flush (or wakes it at BATCH_SIZE): a
    loop until the queue was empty wrote a batch of a few rows after every write, since
    calls keep coming while one is written, and each batch's fixed cost (a transaction,
    the chain's head, a thread hop) then took about a third of a core at 1,000 calls a
    second on one connection, competing with every call in flight (issue 13)."""
    done = 0
    left = len(recorder.pending)
    while left > 0 and recorder.pending:
        count = min(BATCH_SIZE, left, len(recorder.pending))
        left -= count
        batch = [recorder.pending.popleft() for _ in range(count)]
        recorder.in_flight += count  # the shutdown flush may write beside the flusher
        try:
            written, unwritten, error = await _write_rows(recorder, batch)
        finally:
            recorder.in_flight -= count
        recorder.stats.written += len(written)
        done += len(written)
        _publish(recorder, written)
        if unwritten:
            _requeue(recorder, unwritten, error)
            raise AuditWriteFailed
    return done


async def _write_rows(recorder: _Recorder, batch: list[Row]) -> tuple[list[Event], list[Row], str]:
    """Written events, the rows to try again later, and why they could not be written."""
    try:
        return await _write_async(batch), [], ""
    except (DataError, IntegrityError):
        pass  # some row is refused on its own: find it below
    except Exception as exc:
        # Database down, a lost connection: keep the batch and retry later.
        return [], batch, type(exc).__name__
    written, refused, rest = await _write_one_by_one_async(batch)
    _set_aside(refused, recorder.stats)
    return written, rest, "the database went away"


def _requeue(recorder: _Recorder, rows: list[Row], error: str) -> None:
    recorder.pending.extendleft(reversed(rows))
    recorder.stats.write_failures += 1
    AUDIT_WRITE_FAILURES.inc()
    logger.error(
        "audit write failed (%s); %d event(s) wait in memory for a retry",
        error,
        len(recorder.pending),
    )


def _set_aside(rows: list[Row], stats: RecorderStats) -> None:
    if rows:
        _append_lines(_data_path(REJECTED_FILE), rows)
        stats.rejected += len(rows)
        AUDIT_REJECTED.inc(len(rows))
        logger.error(
            "audit: the database refused %d event(s); kept in %s",
            len(rows),
            _data_path(REJECTED_FILE),
        )


def _publish(recorder: _Recorder, events: list[Event]) -> None:
    """Publish in the background: a slow channel layer must not hold up the next write."""
    if not events:
        return
    if len(recorder.publishing) >= MAX_PUBLISHING:
        recorder.stats.publish_failures += len(events)
        logger.warning("live feed is behind: %d stored event(s) not published", len(events))
        return

    async def publish() -> None:
        if await audit_publish_payloads(events):
            recorder.stats.published += len(events)
        else:
            recorder.stats.publish_failures += len(events)

    task = asyncio.get_running_loop().create_task(publish())
    recorder.publishing.add(task)
    task.add_done_callback(recorder.publishing.discard)


async def _flush_forever(recorder: _Recorder) -> None:
    backoff = FLUSH_INTERVAL_SECONDS
    while True:
        AUDIT_QUEUE.set(audit_backlog())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recorder.wake.wait(), timeout=backoff)
        recorder.wake.clear()
        try:
            written = await _flush_once(recorder)
            backoff = FLUSH_INTERVAL_SECONDS
            if written or time.monotonic() >= recorder.next_spill_check:
                recorder.next_spill_check = time.monotonic() + SPILL_CHECK_SECONDS
                await _replay_if_spilled(recorder)
        except Exception:
            # Logged where it failed; the rows are back in the queue.
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)


# --- the spill file ----------------------------------------------------------------------
def _data_path(name: str) -> Path:
    return Path(settings.DATA_DIR) / name


def _to_line(row: Row) -> str:
    data = dict(row)
    if isinstance(data.get("created_at"), datetime):
        data["created_at"] = data["created_at"].isoformat()
    return json.dumps(data, default=str) + "\n"


def _from_line(line: str) -> Row:
    row: Row = json.loads(line)
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


def _append_lines(path: Path, rows: Iterable[Row]) -> None:
    """Append under an exclusive lock, to the file that is at ``path`` right now.

    A replay renames the file away; a writer that opened it just before must not append to
    the renamed copy after the replay read it, so it checks and opens again.
    """
    text = "".join(_to_line(row) for row in rows)
    while True:
        with path.open("a") as spill:
            fcntl.flock(spill, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(spill.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                spill.write(text)
                spill.flush()
                os.fsync(spill.fileno())
                return


def _spill(rows: list[Row], stats: RecorderStats, *, reason: str) -> None:
    path = _data_path(SPILL_FILE)
    _append_lines(path, rows)
    stats.spilled += len(rows)
    AUDIT_SPILLED.inc(len(rows))
    logger.error("%s: %d audit event(s) spilled to %s", reason, len(rows), path)
    alerts_spilled(count=len(rows), reason=reason, path=str(path))


def audit_spill_replay() -> int:
    """Write spilled events into the database; returns how many. Safe in several processes.

    The spill file is claimed by renaming it (only one process wins), then written in
    batches; what cannot be written goes back to the spill file. A claimed file whose
    process died mid-replay is picked up by the next replay.
    """
    path = _data_path(SPILL_FILE)
    claimed = path.with_name(f"{path.stem}.replaying.{os.getpid()}.{uuid.uuid4().hex}.jsonl")
    files = _orphaned_claims(path)
    with contextlib.suppress(FileNotFoundError):
        path.rename(claimed)
        files.append(claimed)
    replayed = 0
    try:
        for file in files:
            replayed += _replay_file(file, path)
    finally:
        if replayed:
            AUDIT_REPLAYED.inc(replayed)
            logger.warning("audit: replayed %d spilled event(s) from %s", replayed, path)
    return replayed


def _orphaned_claims(path: Path) -> list[Path]:
    orphans = []
    for file in path.parent.glob(f"{path.stem}.replaying.*.jsonl"):
        try:
            os.kill(int(file.name.split(".")[2]), 0)
        except ProcessLookupError:
            orphans.append(file)
        except (PermissionError, ValueError):
            pass  # alive and someone else's, or not a name this module wrote
    return orphans


def _replay_file(file: Path, spill_path: Path) -> int:
    with file.open() as claimed:
        # Waits for a writer that still appends to this inode (see _append_lines).
        fcntl.flock(claimed, fcntl.LOCK_EX)
        lines = claimed.read().splitlines()
    rows: list[Row] = []
    for line in lines:
        try:
            rows.append(_from_line(line))
        except (ValueError, KeyError, TypeError):
            logger.error("audit: an unreadable spill line was skipped: %.200s", line)
    replayed = 0
    for start in range(0, len(rows), BATCH_SIZE):
        batch = rows[start : start + BATCH_SIZE]
        try:
            _write(batch)
            replayed += len(batch)
            continue
        except (DataError, IntegrityError):
            written, refused, rest = _write_one_by_one(batch)
        except Exception:
            written, refused, rest = [], [], batch
        replayed += len(written)
        if refused:
            _append_lines(_data_path(REJECTED_FILE), refused)
            AUDIT_REJECTED.inc(len(refused))
            logger.error("audit: the database refused %d spilled event(s)", len(refused))
        if rest:
            # The database went away again: what is left goes back to wait in the spill file.
            _append_lines(spill_path, rest + rows[start + BATCH_SIZE :])
            file.unlink()
            raise AuditWriteFailed
    file.unlink()
    return replayed


async def _replay_if_spilled(recorder: _Recorder) -> None:
    path = _data_path(SPILL_FILE)
    if not path.exists() and not any(path.parent.glob(f"{path.stem}.replaying.*.jsonl")):
        return
    try:
        recorder.stats.replayed += await db_call(audit_spill_replay)()
    except Exception:
        logger.exception("audit: replaying the spill file failed; it stays for the next try")


# --- for the lifespan, tests and operators -----------------------------------------------
async def audit_flush() -> None:
    """Write everything queued in this event loop now (shutdown, tests).

    If the database cannot take it, the events go to the spill file instead: a shutdown
    never loses what is queued.
    """
    recorder = _recorders.peek()
    if recorder is None:
        return
    with contextlib.suppress(AuditWriteFailed):
        await _flush_once(recorder)
    for _ in range(500):  # a batch the flusher is writing right now: let it land
        if not recorder.in_flight:
            break
        await asyncio.sleep(0.02)
    if recorder.pending:  # what failed here, or the flusher's batch put back
        rows = list(recorder.pending)
        recorder.pending.clear()
        _spill(rows, recorder.stats, reason="audit write failed at shutdown")
    if recorder.publishing:
        await asyncio.wait(set(recorder.publishing), timeout=2)


def audit_recorder_stats() -> RecorderStats:
    recorder = _recorders.peek()
    return recorder.stats if recorder is not None else RecorderStats()


def audit_backlog() -> int:
    """Events queued or being written in every event loop of this process."""
    return sum(len(recorder.pending) + recorder.in_flight for recorder in _recorders.every())
