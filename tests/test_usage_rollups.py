"""The usage rollups: what the task counts from the trail, once, late rows included, and how
the reader groups it (audit/rollups.py, audit/usage.py)."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import Max

from audit import rollups
from audit.models import AuditEvent, UsageCursor, UsageRollup
from audit.rollups import (
    GAP_PATIENCE,
    TTFB_BOUNDS_MS,
    percentile_ms,
    ttfb_bucket,
    usage_rollup,
)
from audit.tasks import usage_rollup_task
from audit.usage import UsageQuery, agent_label, usage_report
from broker.infra.errors import ServiceError
from broker.models import Agent
from broker.services.agents import agent_unenroll
from tests.usage_cast import NOW, agent, call, refused

pytestmark = pytest.mark.django_db

COUNTED = ("calls", "errors", "refusals", "input_tokens", "output_tokens", "cache_read_tokens",
           "cache_write_tokens")  # fmt: skip


def query(**params: str) -> UsageQuery:
    return UsageQuery.parse({"since": "2d", **params}, now=NOW)


@pytest.fixture
def trail(alice: AbstractBaseUser) -> dict[str, Agent]:
    """Bob's and carol's calls over two hours: fine ones, an unpriced one, errors,
    refusals, a client that left, and events that are not calls."""
    bob, carol = agent("bob", alice), agent("carol", alice)
    earlier = NOW - timedelta(hours=1, minutes=10)
    call(bob, input_tokens=100, output_tokens=20, cache_read_tokens=1000,
         cache_write_tokens=50, cost_usd=Decimal("0.001234"), ttfb_ms=120.0)  # fmt: skip
    call(bob, input_tokens=200, output_tokens=40, cost_usd=Decimal("0.002"), ttfb_ms=480.0)
    # Tokens but no price: unknown, never 0.
    call(bob, model="mystery-1", input_tokens=7, output_tokens=3, cost_usd=None, ttfb_ms=90.0)
    call(bob, status=500, outcome="upstream_error", ttfb_ms=3000.0)
    call(bob, status=502, outcome="upstream_unreachable")
    call(bob, status=200, outcome="upstream_broke", input_tokens=5, cost_usd=Decimal("0.000001"))
    call(bob, status=200, outcome="client_gone", ttfb_ms=60.0)  # the client left: no error
    refused(bob)
    refused(bob, status=403, created_at=earlier)
    call(carol, backend="staging", model="claude-sonnet-4-5", input_tokens=1_000_000,
         output_tokens=10, cost_usd=Decimal("3.00015"), created_at=earlier,
         ttfb_ms=700.0)  # fmt: skip
    call(None, status=401, outcome="denied", model="")  # a bad token: no agent known
    # Not calls: never counted.
    AuditEvent.objects.create(action="token.issued", actor_type="agent", agent="bob",
                              agent_id=bob.pk, backend="anthropic")  # fmt: skip
    return {"bob": bob, "carol": carol}


def direct(events: list[AuditEvent], key: Any) -> dict[Any, dict[str, Any]]:
    """The trail summed straight from its rows, by the definitions in docs/decisions.md."""
    zero = dict.fromkeys(COUNTED, 0) | {"cost": Decimal(0), "unknown": 0}
    sums: dict[Any, dict[str, Any]] = defaultdict(lambda: dict(zero))
    for event in events:
        if event.action not in ("proxy.request", "policy.denied"):
            continue
        row = sums[key(event)]
        row["calls"] += 1
        denied = event.policy_result == "denied"
        row["refusals"] += denied
        row["errors"] += not denied and (
            (event.status or 0) >= 400 or event.outcome not in ("ok", "client_gone")
        )
        for name in COUNTED[3:]:
            row[name] += getattr(event, name) or 0
        if event.cost_usd is not None:
            row["cost"] += event.cost_usd
        elif event.input_tokens is not None or event.output_tokens is not None:
            row["unknown"] += 1
    return sums


def test_the_rollups_match_a_direct_sum_of_the_trail(trail: dict[str, Agent]) -> None:
    assert usage_rollup(now=NOW) == 11  # the calls, not the token.issued event
    report = usage_report(query(group_by="agent,backend,model,hour"))
    expected = direct(
        list(AuditEvent.objects.all()),
        lambda e: (
            str(e.agent_id) if e.agent_id else None,
            e.backend,
            e.model,
            e.created_at.replace(minute=0, second=0, microsecond=0),
        ),
    )
    got = {
        (
            row["agent_id"],
            row["backend"],
            row["model"],
            datetime.fromisoformat(row["hour"]),
        ): row
        for row in report["groups"]
    }
    assert set(got) == set(expected)
    for key, sums in expected.items():
        row = got[key]
        for name in COUNTED:
            assert row[name] == sums[name], (key, name)
        assert Decimal(row["cost_usd"]) == sums["cost"], key
        assert row["cost_unknown_calls"] == sums["unknown"], key
    totals = report["totals"]
    assert (totals["calls"], totals["errors"], totals["refusals"]) == (11, 3, 3)
    assert (totals["cache_read_tokens"], totals["cache_write_tokens"]) == (1000, 50)
    assert totals["cost_usd"] == "3.003385"
    assert totals["cost_unknown_calls"] == 1
    # Names come with the ids; the call without an agent is its own group.
    by_agent = {row["agent"]: row for row in usage_report(query(group_by="agent"))["groups"]}
    assert set(by_agent) == {"bob", "carol", ""}
    assert by_agent["bob"]["agent_id"] == str(trail["bob"].pk)
    assert (by_agent["bob"]["calls"], by_agent["bob"]["errors"]) == (9, 3)
    assert by_agent["bob"]["refusals"] == 2
    assert agent_label(by_agent[""]) == "(no agent)"


def test_beat_rolls_up_every_30_seconds_and_each_run_expires_before_the_next(
    settings: Any,
) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["usage-rollup"]
    assert entry["task"] == usage_rollup_task.name
    assert entry["schedule"] <= 30  # "correct within a minute"
    assert entry["options"]["expires"] < entry["schedule"]


def test_a_second_run_counts_nothing_twice(trail: dict[str, Agent]) -> None:
    usage_rollup_task.apply()
    first = usage_report(query(group_by="agent,model"))
    assert first["totals"]["calls"] == 11
    assert usage_rollup(now=NOW) == 0
    usage_rollup_task.apply()
    assert usage_report(query(group_by="agent,model")) == first
    call(trail["carol"], input_tokens=1, output_tokens=1, cost_usd=Decimal("0.5"))
    assert usage_rollup(now=NOW) == 1
    assert usage_report(query())["totals"]["calls"] == 12


def test_a_worker_that_lost_the_claim_counts_nothing(
    trail: dict[str, Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker claims the cursor between this one's read and its claim: this one's
    conditional update finds a new version, and it adds nothing."""
    real_gaps_left = rollups._gaps_left
    raced: list[int] = []

    def another_worker_meanwhile(*args: Any) -> Any:
        if not raced:
            raced.append(-1)
            raced[0] = usage_rollup(now=NOW)  # the other worker, first to claim
        return real_gaps_left(*args)

    monkeypatch.setattr(rollups, "_gaps_left", another_worker_meanwhile)
    assert usage_rollup(now=NOW) == 0
    assert raced == [11]
    assert usage_report(query())["totals"]["calls"] == 11
    assert UsageCursor.objects.get().version == 1


@pytest.mark.django_db(transaction=True)
def test_workers_running_at_once_count_every_call_once(
    alice: AbstractBaseUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four workers at once, each on its own connection, over many small chunks."""
    monkeypatch.setattr(rollups, "CHUNK", 50)
    bob = agent("bob", alice)
    AuditEvent.objects.bulk_create(
        [AuditEvent(action="proxy.request", actor_type="agent", agent="bob", agent_id=bob.pk,
                    backend="anthropic", model="claude-haiku-4-5", status=200, outcome="ok",
                    input_tokens=n, created_at=NOW) for n in range(1, 1001)]
    )  # fmt: skip

    def worker() -> int:
        try:
            return usage_rollup(now=NOW)
        finally:
            connection.close()

    with ThreadPoolExecutor(4) as pool:
        counted = [future.result() for future in [pool.submit(worker) for _ in range(4)]]
    assert sum(counted) == 1000
    totals = usage_report(query())["totals"]
    assert (totals["calls"], totals["input_tokens"]) == (1000, 1000 * 1001 // 2)
    assert usage_rollup(now=NOW) == 0


def test_rows_committed_after_later_ones_are_still_counted(
    trail: dict[str, Agent],
) -> None:
    """PostgreSQL hands out ids when a batch starts and shows them when it commits: a batch
    can be read while an earlier one is still being written. The ids the watermark passed
    are looked for again, for GAP_PATIENCE."""
    bob = trail["bob"]
    usage_rollup(now=NOW)
    top = AuditEvent.objects.aggregate(top=Max("id"))["top"]
    # The later batch lands first (ids top+4, top+5) ...
    for offset in (4, 5):
        call(bob, id=top + offset, input_tokens=10, cost_usd=Decimal("0.01"))
    assert usage_rollup(now=NOW) == 2
    assert UsageCursor.objects.get().gaps == [[top + 1, top + 3, NOW.isoformat()]]
    # ... then the earlier one commits, seconds later and with an earlier time.
    late = NOW + timedelta(seconds=20)
    call(bob, id=top + 1, input_tokens=1000, created_at=NOW - timedelta(hours=1, minutes=30))
    call(bob, id=top + 2, input_tokens=1000)
    assert usage_rollup(now=late) == 2
    assert UsageCursor.objects.get().gaps == [[top + 3, top + 3, NOW.isoformat()]]
    totals = usage_report(query(agent=str(bob.pk)))["totals"]
    assert totals["calls"] == 9 + 4
    assert totals["input_tokens"] == 312 + 20 + 2000
    # The earlier hour got the late row of its hour.
    hours = usage_report(query(agent=str(bob.pk), group_by="hour"))["groups"]
    assert [row["input_tokens"] for row in hours] == [1000, 312 + 20 + 1000]
    # A gap that never fills (a rolled-back batch) is given up after GAP_PATIENCE.
    usage_rollup(now=NOW + GAP_PATIENCE + timedelta(seconds=1))
    assert UsageCursor.objects.get().gaps == []
    assert usage_rollup(now=NOW + GAP_PATIENCE * 2) == 0


def test_agents_of_one_name_are_kept_apart_after_an_unenroll(alice: AbstractBaseUser) -> None:
    first = agent("bob", alice)
    call(first, input_tokens=10, cost_usd=Decimal("0.1"))
    agent_unenroll(agent=first)
    second = agent("bob", alice)  # the name is free again
    call(second, input_tokens=1, cost_usd=Decimal("0.01"))
    call(second, input_tokens=1, cost_usd=Decimal("0.01"))
    usage_rollup(now=NOW)

    groups = usage_report(query(group_by="agent"))["groups"]
    assert [(row["agent"], row["calls"], row["input_tokens"]) for row in groups] == [
        ("bob", 2, 2),
        ("bob", 1, 10),
    ]
    assert [row["agent_id"] for row in groups] == [str(second.pk), str(first.pk)]
    assert groups[1]["agent_status"] == "unenrolled"
    assert agent_label(groups[0]) == "bob"
    assert agent_label(groups[1]) == f"bob (unenrolled, {str(first.pk)[:8]})"
    # By id: one of them; by name: both, as the name was theirs in turn.
    assert usage_report(query(agent=str(second.pk)))["totals"]["calls"] == 2
    assert usage_report(query(agent="bob"))["totals"]["calls"] == 3
    # The unenrollment and the enrollments are recorded with each agent's own id.
    ids = set(
        AuditEvent.objects.filter(action__startswith="agent.").values_list("action", "agent_id")
    )
    assert ("agent.unenrolled", first.pk) in ids
    assert ("agent.enrolled", second.pk) in ids


GROUPINGS = ["", "agent", "backend", "model", "day", "hour", "agent,model", "backend,day",
             "agent,backend,model,hour", "model,agent,day"]  # fmt: skip


@pytest.mark.parametrize("group_by", GROUPINGS)
def test_every_grouping_adds_up_to_the_totals(trail: dict[str, Agent], group_by: str) -> None:
    usage_rollup(now=NOW)
    report = usage_report(query(group_by=group_by))
    wanted = [name for name in group_by.split(",") if name]
    assert report["group_by"] == wanted
    groups = report["groups"]
    column = {"agent": "agent_id"}
    keys = {tuple(row[column.get(name, name)] for name in wanted) for row in groups}
    assert len(keys) == len(groups)  # each group once
    for name in ("calls", "errors", "refusals", "input_tokens", "cache_read_tokens"):
        assert sum(row[name] for row in groups) == report["totals"][name]
    total_cost = sum(Decimal(row["cost_usd"]) for row in groups)
    assert total_cost == Decimal(report["totals"]["cost_usd"])
    if "day" in wanted:
        assert {row["day"] for row in groups} == {"2026-12-07"}
    if wanted == ["hour"]:
        assert [row["hour"] for row in groups] == ["2026-12-07T13:00:00Z", "2026-12-07T14:00:00Z"]


def test_filters_narrow_by_backend_model_and_range(trail: dict[str, Agent]) -> None:
    usage_rollup(now=NOW)
    assert usage_report(query(backend="staging"))["totals"]["calls"] == 1
    assert usage_report(query(model="mystery-1"))["totals"]["cost_unknown_calls"] == 1
    # Whole UTC hours: since 30m back is the start of this hour.
    recent = usage_report(query(since="30m"))
    assert recent["since"] == "2026-12-07T14:00:00Z"
    assert recent["until"] == "2026-12-07T15:00:00Z"
    assert recent["totals"]["calls"] == 9


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-45"}, "until"),
        ({"group_by": "agent,week"}, "group_by"),
        ({"group_by": "day,hour"}, "group_by"),
        ({"since": "1h", "until": "2h"}, "until"),
        ({"since": "1000d"}, "since"),
        ({"agent": "x" * 201}, "agent"),
        ({"since": "9999-12-31T23:00", "until": "9999-12-31T23:59"}, "until"),
    ],
)
def test_bad_queries_name_their_field(params: dict[str, str], field: str) -> None:
    with pytest.raises(ServiceError) as refused_query:
        UsageQuery.parse(params, now=NOW)
    assert refused_query.value.field == field


def test_time_to_first_byte_percentiles_are_within_their_bucket() -> None:
    # 1,000 calls at 1..1000 ms: the true p50 is 500 ms and the true p95 950 ms.
    histogram = [0] * (len(TTFB_BOUNDS_MS) + 1)
    for milliseconds in range(1, 1001):
        histogram[ttfb_bucket(float(milliseconds))] += 1
    for fraction, exact in ((0.5, 500.0), (0.95, 950.0)):
        estimate = percentile_ms(histogram, fraction)
        assert estimate is not None
        bucket = ttfb_bucket(exact)
        low = TTFB_BOUNDS_MS[bucket - 1]
        high = TTFB_BOUNDS_MS[bucket]
        assert low <= estimate <= high
        assert abs(estimate - exact) <= high - low
    assert percentile_ms([0] * len(histogram), 0.5) is None
    slow = [0] * len(histogram)
    slow[-1] = 3
    assert percentile_ms(slow, 0.5) == TTFB_BOUNDS_MS[-1]  # "at least the last bound"


def test_percentiles_merge_across_rollup_rows(trail: dict[str, Agent]) -> None:
    usage_rollup(now=NOW)
    assert UsageRollup.objects.filter(agent_key=str(trail["bob"].pk)).count() > 1
    bob = usage_report(query(agent=str(trail["bob"].pk)))["totals"]
    # bob's first bytes: 60, 90, 120, 480, 3000 ms: the median is in 100-150.
    assert 100 <= bob["ttfb_p50_ms"] <= 150
    assert 2500 <= bob["ttfb_p95_ms"] <= 3000
