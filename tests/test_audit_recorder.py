"""The proxy's recorder: nothing is lost when the database is down, the buffer is full, a row is
refused or the server stops; and a burst of thousands of calls gives exactly that many rows."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connections

from audit import recorder
from audit.metrics_view import SpillFile
from audit.models import AuditEvent
from audit.recorder import (
    REJECTED_FILE,
    SPILL_FILE,
    audit_backlog,
    audit_enqueue,
    audit_flush,
    audit_recorder_stats,
    audit_spill_replay,
)
from broker.infra.db import db_call
from broker.infra.metrics import LOCAL
from tests.proxy_cast import Proxied, audit_drained
from tests.waiting import until

pytestmark = pytest.mark.django_db(transaction=True)

Writer = Callable[[list[dict[str, Any]]], Awaitable[list[AuditEvent]]]


@pytest.fixture(autouse=True)
async def close_executor_connections() -> AsyncIterator[None]:
    """ORM calls from an async test run in asgiref's executor thread, whose connection would
    otherwise outlive the test database (PostgreSQL then refuses to drop it)."""
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
def data_dir(tmp_path: Path, settings: Any) -> Path:
    settings.DATA_DIR = tmp_path
    return tmp_path


@pytest.fixture
async def loop_recorder() -> AsyncIterator[None]:
    """This test's event loop gets its own recorder; its flusher stops with the test."""
    yield
    state = recorder._recorders.pop()
    if state is not None and state.task is not None:
        state.task.cancel()


class FlakyDatabase:
    """The recorder's writer, failing like a database that is down until told otherwise."""

    def __init__(self, real: Writer) -> None:
        self.real = real
        self.down = True
        self.attempts = 0

    async def __call__(self, batch: list[dict[str, Any]]) -> list[AuditEvent]:
        self.attempts += 1
        if self.down:
            raise OperationalError("could not connect to server: Connection refused")
        return await self.real(batch)


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> FlakyDatabase:
    flaky = FlakyDatabase(recorder._write_async)
    monkeypatch.setattr(recorder, "_write_async", flaky)
    return flaky


def enqueue(count: int, *, start: int = 0) -> None:
    for number in range(start, start + count):
        audit_enqueue(action="proxy.request", agent="bob", backend="anthropic", status=200,
                      request_id=f"req_{number}")  # fmt: skip


async def stored() -> list[str]:
    ordered = AuditEvent.objects.order_by("request_id")
    return [r async for r in ordered.values_list("request_id", flat=True)]


def metric(name: str, **labels: str) -> float:
    """This process's value of a /metrics sample (the suite runs without a multiprocess dir)."""
    return LOCAL.get_sample_value(name, labels) or 0.0


def spill_bytes() -> float:
    """What /metrics reads from the data directory at scrape time."""
    (family,) = SpillFile().collect()
    return float(family.samples[0].value)


CALLS = ("keybroker_proxy_calls_total", {"backend": "anthropic", "status": "200", "outcome": ""})


def spilled_lines(data_dir: Path, name: str = SPILL_FILE) -> list[dict[str, Any]]:
    path = data_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_events_wait_while_the_database_is_down_and_are_written_when_it_is_back(
    loop_recorder: None, database: FlakyDatabase, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(3)
    await until(lambda: database.attempts >= 2, timeout=10, what="a second write attempt")
    assert audit_backlog() == 3
    # /metrics' queue depth is set by the flusher on each pass, failed ones included.
    assert metric("keybroker_audit_queue_depth") == 3
    assert audit_recorder_stats().write_failures >= 2
    assert "audit write failed (OperationalError); 3 event(s) wait in memory" in caplog.text

    database.down = False
    await until(lambda: audit_backlog() == 0, timeout=10, what="the queue to drain")
    assert await stored() == ["req_0", "req_1", "req_2"]
    assert audit_recorder_stats().written == 3
    await until(
        lambda: metric("keybroker_audit_queue_depth") == 0, timeout=10, what="the gauge at 0"
    )
    assert not (data_dir / SPILL_FILE).exists()


async def test_a_full_buffer_spills_to_disk_and_the_spill_is_replayed_when_writes_succeed(
    loop_recorder: None,
    database: FlakyDatabase,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(recorder, "BUFFER_LIMIT", 5)
    before = {
        name: metric(name, **labels)
        for name, labels in (
            CALLS, ("keybroker_audit_spilled_events_total", {}),
            ("keybroker_audit_replayed_events_total", {}),
        )
    }  # fmt: skip
    enqueue(8)
    assert audit_backlog() == 5
    assert [row["request_id"] for row in spilled_lines(data_dir)] == ["req_5", "req_6", "req_7"]
    assert audit_recorder_stats().spilled == 3
    assert spill_bytes() == (data_dir / SPILL_FILE).stat().st_size > 0
    assert f"audit buffer full: 1 audit event(s) spilled to {data_dir / SPILL_FILE}" in caplog.text

    caplog.clear()
    database.down = False
    await until(lambda: audit_recorder_stats().replayed == 3, timeout=10, what="3 events replayed")
    assert await stored() == [f"req_{n}" for n in range(8)]
    assert not (data_dir / SPILL_FILE).exists()
    assert spill_bytes() == 0
    assert "replayed 3 spilled event(s)" in caplog.text
    # A replayed row is the event as it was queued, time included.
    assert await AuditEvent.objects.filter(agent="bob", status=200).acount() == 8
    # /metrics counts each call once, when it is written: the 5 queued and the 3 replayed.
    assert metric(CALLS[0], **CALLS[1]) - before[CALLS[0]] == 8
    for name in ("keybroker_audit_spilled_events_total", "keybroker_audit_replayed_events_total"):
        assert metric(name) - before[name] == 3


async def test_a_row_the_database_refuses_is_set_aside_and_does_not_block_the_others(
    loop_recorder: None, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls_before = metric(CALLS[0], **CALLS[1])
    rejected_before = metric("keybroker_audit_rejected_events_total")
    enqueue(2)
    # A row that got past the clean-up (a bug somewhere): the column refuses a negative count.
    bad = dict(recorder._recorder().pending[0], request_id="req_bad", input_tokens=-1)
    recorder._recorder().pending.insert(1, bad)
    await until(lambda: audit_backlog() == 0, timeout=10, what="the queue to drain")
    assert await stored() == ["req_0", "req_1"]
    assert [row["request_id"] for row in spilled_lines(data_dir, REJECTED_FILE)] == ["req_bad"]
    assert audit_recorder_stats().rejected == 1
    # The refused row is no call in the audit trail, so none in /metrics either.
    assert metric(CALLS[0], **CALLS[1]) - calls_before == 2
    assert metric("keybroker_audit_rejected_events_total") - rejected_before == 1
    assert "the database refused 1 event(s)" in caplog.text


async def test_a_shutdown_that_cannot_write_spills_everything_queued(
    loop_recorder: None, database: FlakyDatabase, data_dir: Path
) -> None:
    enqueue(4)
    await audit_flush()  # what the ASGI lifespan calls on shutdown
    assert audit_backlog() == 0
    assert len(spilled_lines(data_dir)) == 4
    assert await stored() == []

    assert await db_call(audit_spill_replay)() == 4  # a later process, once the database is up
    assert await stored() == ["req_0", "req_1", "req_2", "req_3"]


def test_a_replay_left_half_done_by_a_dead_process_is_finished_by_the_next(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    dead = subprocess.Popen(["true"])
    dead.wait()
    row = {
        "action": "proxy.request", "actor_type": "agent", "actor": "bob", "agent": "bob",
        "created_at": "2026-11-23T10:00:00+00:00", "request_id": "req_orphan", "detail": {},
    }  # fmt: skip
    (data_dir / f"audit-spill.replaying.{dead.pid}.abc.jsonl").write_text(json.dumps(row) + "\n")
    (data_dir / SPILL_FILE).write_text(json.dumps({**row, "request_id": "req_new"}) + "\n")

    assert audit_spill_replay() == 2
    assert sorted(AuditEvent.objects.values_list("request_id", flat=True)) == [
        "req_new",
        "req_orphan",
    ]
    assert list(data_dir.iterdir()) == []


async def test_a_burst_of_2000_proxied_calls_gives_exactly_2000_events(proxied: Proxied) -> None:
    calls = 2000
    gate = asyncio.Semaphore(50)
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=proxied.base_url, limits=limits, timeout=60) as http:

        async def call(number: int) -> int:
            async with gate:
                response = await http.post(
                    "/v1/messages",
                    headers={"x-api-key": proxied.token},
                    json={"model": "claude-haiku-4-5", "max_tokens": 8,
                          "messages": [{"role": "user", "content": f"call {number}"}]},
                )  # fmt: skip
                return response.status_code

        statuses = await asyncio.gather(*(call(n) for n in range(calls)))
    assert statuses == [200] * calls
    await asyncio.to_thread(audit_drained, 30)
    events = AuditEvent.objects.filter(action="proxy.request")
    assert await events.acount() == calls
    assert await events.filter(status=200, input_tokens=12, output_tokens=6).acount() == calls
    assert len({r async for r in events.values_list("request_id", flat=True)}) == calls
