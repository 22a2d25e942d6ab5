"""An upstream that misbehaves: each fault gives the client a clear answer (a status and
Anthropic's error body) or a broken stream, never a hang or a stream that looks whole; the
web process's memory stays bounded whatever the upstream sends; and the audit event of the
call says what happened."""

from __future__ import annotations

import json
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import AbstractBaseUser

from audit.models import AuditEvent
from broker.services.backends import backend_add
from proxy.metering import UsageMeter
from tests.faults.cast import ANSWER_BOUND_SECONDS, MESSAGE, agent_token
from tests.faults.chaos import BOMB_DECOMPRESSED, HUGE_LINE, ChaosUpstream, gzip_bomb
from tests.faults.figures import Figure, Figures
from tests.faults.processes import WebProcess
from tests.keys import api_key
from tests.waiting import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

# What the web process may grow by, over the whole module, at its peak: honest traffic and
# every fault here cost it 1-2 MB; holding the 50 MB line would pass it, and so did the
# meter's regexes on the bomb's blank lines (about 120 bytes of regex state per line).
MEMORY_CEILING = 24 * 1024 * 1024


@dataclass(frozen=True)
class Expected:
    stream: bool
    status: int
    broken: bool  # the client's read of the body must fail, not end as if whole
    outcome: str
    says: str  # in the audit event's message, or why it went unmetered


FAULTS = {
    "reset-before-headers": Expected(False, 502, False, "upstream_unreachable", "unreachable"),
    "silent-before-headers": Expected(False, 504, False, "upstream_timeout", "timed out"),
    "reset-after-headers": Expected(True, 200, True, "upstream_broke", "cut the stream"),
    "cut-mid-event": Expected(True, 200, True, "upstream_broke", "cut the stream"),
    "silent-mid-stream": Expected(True, 200, True, "upstream_broke", "went silent"),
    "gzip-short": Expected(False, 200, True, "upstream_broke", "cut the stream"),
    "bomb": Expected(True, 200, False, "ok", "over 16 MB decompressed"),
    "huge-line": Expected(True, 200, False, "ok", "a line over 1 MB"),
}


@dataclass
class Seen:
    status: int
    error: dict[str, Any] | None  # the error body, when the answer is one
    head: bytes  # the body's first 64 KB, as sent
    received: int  # body bytes, as sent (compressed or not)
    broken: str  # why reading the body failed; empty when it ended whole
    seconds: float


def through(web: WebProcess, token: str, fault: str, *, stream: bool) -> Seen:
    started = time.monotonic()
    headers = {"x-api-key": token, "accept-encoding": "gzip"}
    if fault:
        headers["x-chaos"] = fault
    received, broken, error, body = 0, "", None, b""
    with httpx.stream(
        "POST",
        f"{web.url}/v1/proxy/anthropic/v1/messages",
        json={**MESSAGE, "stream": stream},
        headers=headers,
        timeout=ANSWER_BOUND_SECONDS,
    ) as response:
        try:
            for chunk in response.iter_raw():
                received += len(chunk)
                body += chunk[: 65536 - len(body)]
            if response.status_code != 200:
                error = json.loads(body)
        except httpx.TransportError as exc:
            broken = type(exc).__name__
    return Seen(response.status_code, error, body, received, broken, time.monotonic() - started)


@pytest.fixture
def caller(chaos: ChaosUpstream, alice: AbstractBaseUser) -> str:
    backend_add(name="anthropic", secret=api_key(tail="Ch4o"), base_url=chaos.url)
    return agent_token("chaos", alice).plaintext


@pytest.fixture(scope="module")
def baseline(chaos_web: WebProcess) -> int:
    """The web process's peak memory before any fault, after it served a first call."""
    return chaos_web.peak_rss()


def events(count: int) -> list[AuditEvent]:
    """The audit events of this test's calls, once the web process wrote them all.

    Waited for in every test: an event written after the test ends would land in the
    next test's database.
    """
    calls = AuditEvent.objects.filter(action="proxy.request").order_by("id")
    wait_until(
        lambda: calls.count() >= count,
        timeout=10,
        what=lambda: f"{count} audit events (there are {calls.count()})",
    )
    assert calls.count() == count
    return list(calls)


def test_an_upstream_that_answers_well_is_passed_through(
    chaos_web: WebProcess, caller: str, baseline: int
) -> None:
    for stream in (False, True):
        seen = through(chaos_web, caller, "", stream=stream)
        assert (seen.status, seen.broken) == (200, "")
    assert [e.outcome for e in events(2)] == ["ok", "ok"]


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_gets_a_clear_answer_or_a_broken_stream(
    fault: str,
    chaos_web: WebProcess,
    chaos: ChaosUpstream,
    caller: str,
    baseline: int,
    figures: Figures,
) -> None:
    expected = FAULTS[fault]
    seen = through(chaos_web, caller, fault, stream=expected.stream)

    assert seen.seconds < ANSWER_BOUND_SECONDS
    assert chaos.requests[-1].chaos == fault
    assert (seen.status, bool(seen.broken)) == (expected.status, expected.broken), seen.error
    if expected.status != 200:
        assert seen.error is not None
        assert seen.error["type"] == "error"
        assert seen.error["error"]["type"] == "api_error"
    if fault == "bomb":
        assert seen.received == len(gzip_bomb())  # forwarded as sent, never inflated
    if fault == "huge-line":
        assert seen.received > HUGE_LINE

    (recorded,) = events(1)
    assert (recorded.status, recorded.outcome) == (expected.status, expected.outcome)
    assert expected.says in recorded.message + recorded.detail.get("unmetered", "")
    grown = chaos_web.peak_rss() - baseline
    assert grown < MEMORY_CEILING

    sent = {
        "bomb": f"a gzip bomb ({BOMB_DECOMPRESSED // 2**20} MB inflated)",
        "huge-line": f"one SSE line of {HUGE_LINE // 2**20} MB",
    }.get(fault, fault)
    figures.add(
        Figure(
            case=f"Upstream: {sent}",
            load="1 call",
            faults=fault,
            refused=f"{seen.status}" + (", stream broken" if seen.broken else ""),
            lost=0,
            holds=f"audited {recorded.outcome} ({expected.says}); peak memory +{grown // 2**20} MB",
        )
    )


def test_a_burst_of_529s_reaches_the_client_as_anthropic_sent_it(
    chaos_web: WebProcess, chaos: ChaosUpstream, caller: str, figures: Figures
) -> None:
    burst = [through(chaos_web, caller, "overloaded", stream=False) for _ in range(10)]
    after = through(chaos_web, caller, "", stream=False)

    assert {(s.status, s.error["error"]["type"]) for s in burst if s.error} == {
        (529, "overloaded_error")
    }
    assert len([s for s in burst if s.error]) == 10
    assert after.status == 200
    assert sorted((e.status, e.outcome) for e in events(11)) == [
        (200, "ok"), *[(529, "upstream_error")] * 10,
    ]  # fmt: skip
    figures.add(
        Figure(
            case="Upstream: a burst of 529 overloaded",
            load="11 calls",
            faults="10 answers 529, then a good one",
            refused="10 (529, Anthropic's body unchanged)",
            lost=0,
            holds="the next call goes through; each audited upstream_error",
        )
    )


@pytest.mark.parametrize(
    "body",
    [
        b"event: ping\n" + b"\n" * (1024 * 1024),  # a run of blank lines
        b"event: ping\n" + b"data:\n" * (256 * 1024) + b"\n",  # a frame of empty data lines
    ],
    ids=["blank-lines", "empty-data-lines"],
)
def test_the_meter_holds_no_more_than_a_chunk_it_reads(body: bytes) -> None:
    """In one chunk, as a slow client lets the upstream's bytes pile up: the meter's regexes
    must not keep state per line (they kept about 120 bytes a line)."""
    meter = UsageMeter(content_type="text/event-stream")
    tracemalloc.start()
    try:
        meter.feed(body)
        meter.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(body)


def test_bytes_after_an_answer_never_become_the_next_calls_answer(
    chaos_web: WebProcess, chaos: ChaosUpstream, caller: str
) -> None:
    """An upstream that sends more than its Content-Length: the connection is not used again,
    so the bytes after the answer are never read as another call's answer (which could be
    another agent's)."""
    lying = through(chaos_web, caller, "gzip-long", stream=False)
    assert (lying.status, lying.broken) == (200, "")
    after = [through(chaos_web, caller, "", stream=False) for _ in range(3)]
    assert [json.loads(seen.head)["type"] for seen in after] == ["message"] * 3
    assert [e.status for e in events(4)] == [200] * 4
