"""Usage rollups: the proxied calls of the audit trail, summed per UTC hour, agent, backend and
model, so the usage API and page never scan the trail (docs/decisions.md, "Usage and rollups").

``usage_rollup`` is the only writer. It reads the audit rows after its watermark, an audit
row id (never a time: the recorder writes in batches, seconds after ``created_at``), adds
them to the rollups and moves the watermark in the same transaction, after claiming the
cursor with a conditional update on its version: a second worker that read the same
version updates nothing and counts nothing.

Ids are not always committed in order: on PostgreSQL two recorder batches get their ids
when they start and become visible when they commit, so a later batch can be read while an
earlier one is still being written. Ids the watermark passes without seeing are kept as
gaps and looked for again on each run until ``GAP_PATIENCE`` has passed (a rolled-back
insert leaves a gap that never fills).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.models import AuditEvent, UsageCursor, UsageRollup

logger = logging.getLogger(__name__)

CURSOR = "usage"
# The actions that are proxied calls: each is one call, allowed or refused.
USAGE_ACTIONS = frozenset({"proxy.request", "policy.denied"})
# Outcomes of an allowed call that are not errors: it went well, or the client left.
CLEAN_OUTCOMES = frozenset({"ok", "client_gone", ""})
# Audit rows read per transaction.
CHUNK = 5000
# How long an id the watermark passed is looked for: far longer than a recorder batch takes
# to commit (milliseconds), short enough that the list of gaps stays small.
GAP_PATIENCE = timedelta(minutes=10)
# More open gap ranges than this (a pathological burst of rollbacks) and the oldest go.
MAX_GAP_RANGES = 1000
# Upper bounds of the time-to-first-byte buckets, in milliseconds; a last bucket holds
# everything slower. Neighbours are at most 1.5 times apart, which bounds how far a
# percentile read from them can be off (percentile_ms).
TTFB_BOUNDS_MS: tuple[float, ...] = (
    10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 750, 1000, 1250,
    1500, 2000, 2500, 3000, 4000, 5000, 6000, 7500, 10_000, 15_000, 20_000, 30_000, 45_000,
    60_000, 90_000, 120_000,
)  # fmt: skip
BUCKETS = len(TTFB_BOUNDS_MS) + 1

_ROW_FIELDS = (
    "id", "created_at", "action", "agent", "agent_id", "backend", "model", "status", "outcome",
    "policy_result", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens", "ttfb_ms", "cost_usd",
)  # fmt: skip
_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
_COUNTS = ("calls", "errors", "refusals", *_TOKENS, "cost_unknown")


def call_refused(row: dict[str, Any]) -> bool:
    """keybroker said no (a bad token, no grant, a policy rule, a rate or budget)."""
    return row.get("policy_result") == "denied"


def call_failed(row: dict[str, Any]) -> bool:
    """An error: a call keybroker let through that did not end well. The upstream answered
    4xx/5xx, could not be reached, broke off a stream, or keybroker cut it (a revoked token,
    an invalid key). A client that hung up is not an error."""
    if call_refused(row):
        return False
    return (row.get("status") or 0) >= 400 or row.get("outcome", "") not in CLEAN_OUTCOMES


def cost_unknown(row: dict[str, Any]) -> bool:
    """Tokens were counted but no price was found for them (or the metering was partial):
    its cost is unknown, and never summed as 0. A call that counted no tokens (a refusal,
    ``GET /v1/models``) cost nothing."""
    return row.get("cost_usd") is None and any(row.get(name) is not None for name in _TOKENS)


def ttfb_bucket(milliseconds: float) -> int:
    return bisect.bisect_left(TTFB_BOUNDS_MS, milliseconds)


def histogram_merge(into: list[int], other: Sequence[int]) -> list[int]:
    """Adds ``other`` to ``into`` (both of BUCKETS counts; an empty list is all zeros)."""
    if len(into) < BUCKETS:
        into.extend([0] * (BUCKETS - len(into)))
    for index, count in enumerate(other[:BUCKETS]):
        into[index] += int(count)
    return into


def percentile_ms(histogram: Sequence[int], fraction: float) -> float | None:
    """The time under which ``fraction`` of the calls got their first byte, from the buckets.

    The true value lies in the bucket this finds; inside it the calls are taken as evenly
    spread, so the answer is off by less than that bucket's width (at most half its lower
    bound). Beyond the last bound only "at least that" is known: the last bound is given.
    """
    total = sum(histogram)
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(histogram):
        if count and seen + count >= rank:
            if index >= len(TTFB_BOUNDS_MS):
                return TTFB_BOUNDS_MS[-1]
            low = TTFB_BOUNDS_MS[index - 1] if index else 0.0
            high = TTFB_BOUNDS_MS[index]
            return round(low + (high - low) * (rank - seen) / count, 1)
        seen += count
    return TTFB_BOUNDS_MS[-1]


@dataclass
class _Sums:
    agent_name: str = ""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0))
    cost: Decimal = Decimal(0)
    histogram: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def add(self, row: dict[str, Any]) -> None:
        if row["agent"]:
            self.agent_name = row["agent"]  # rows come in id order: the latest name wins
        counts = self.counts
        counts["calls"] += 1
        counts["refusals"] += call_refused(row)
        counts["errors"] += call_failed(row)
        for name in _TOKENS:
            counts[name] += row[name] or 0
        if row["cost_usd"] is not None:
            self.cost += row["cost_usd"]
        counts["cost_unknown"] += cost_unknown(row)
        if row["ttfb_ms"] is not None:
            self.histogram[ttfb_bucket(row["ttfb_ms"])] += 1


Key = tuple[datetime, str, str, str]


def _key(row: dict[str, Any]) -> Key:
    hour = row["created_at"].astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    agent_key = str(row["agent_id"]) if row["agent_id"] else ""
    return hour, agent_key, row["backend"], row["model"]


def _ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for value in sorted(ids):
        if ranges and value == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], value)
        else:
            ranges.append((value, value))
    return ranges


def _missing(low: int, high: int, present: set[int]) -> list[tuple[int, int]]:
    """The ranges of ids in ``low..high`` not in ``present``."""
    gaps: list[tuple[int, int]] = []
    start = low
    for value in sorted(v for v in present if low <= v <= high):
        if value > start:
            gaps.append((start, value - 1))
        start = value + 1
    if start <= high:
        gaps.append((start, high))
    return gaps


def _gaps_left(gaps: list[list[Any]], found: set[int], now: datetime) -> list[list[Any]]:
    """The old gaps still worth looking for, without the ids just found."""
    kept: list[list[Any]] = []
    for first, last, seen_at in gaps:
        if now - datetime.fromisoformat(seen_at) > GAP_PATIENCE:
            continue
        kept += [[low, high, seen_at] for low, high in _missing(first, last, found)]
    return kept


def usage_rollup(*, now: datetime | None = None, budget_seconds: float = 20.0) -> int:
    """Count every audit row not counted yet; returns how many proxied calls were added.

    Safe to run in several workers at once and to run again: each row is counted once.
    A long backlog (the first run over an old trail) is taken a chunk per transaction and
    left for the next run after ``budget_seconds``, well inside the task's time limit.
    """
    added = 0
    deadline = time.monotonic() + budget_seconds
    while True:
        count, more = _rollup_chunk(now or timezone.now())
        added += count
        if not more or time.monotonic() > deadline:
            return added


def _rollup_chunk(now: datetime) -> tuple[int, bool]:
    with transaction.atomic():
        cursor, _ = UsageCursor.objects.get_or_create(name=CURSOR)
        look_for = Q(id__gt=cursor.last_id)
        for first, last, _seen in cursor.gaps:
            look_for |= Q(id__gte=first, id__lte=last)
        rows = list(AuditEvent.objects.filter(look_for).order_by("id").values(*_ROW_FIELDS)[:CHUNK])
        found = {row["id"] for row in rows}
        new_ids = {i for i in found if i > cursor.last_id}
        last_id = max(new_ids, default=cursor.last_id)
        stamp = now.isoformat()
        gaps = _gaps_left(cursor.gaps, found, now)
        # A fresh cursor starts at the first row it sees: ids below it are rows retention
        # deleted (or, on PostgreSQL, ids rolled back), not rows still being written.
        start = cursor.last_id + 1 if cursor.last_id or not found else min(found)
        gaps += [[low, high, stamp] for low, high in _missing(start, last_id, found)]
        if len(gaps) > MAX_GAP_RANGES:
            logger.warning("usage rollup: %d id gaps; the oldest are dropped", len(gaps))
            gaps = gaps[-MAX_GAP_RANGES:]
        if not rows and gaps == cursor.gaps:
            return 0, False
        claimed = UsageCursor.objects.filter(pk=cursor.pk, version=cursor.version).update(
            last_id=last_id, gaps=gaps, version=cursor.version + 1, updated_at=now
        )
        if not claimed:
            # Another worker counted these rows meanwhile; it will also count what follows.
            return 0, False
        calls = [row for row in rows if row["action"] in USAGE_ACTIONS]
        _apply(calls)
    return len(calls), len(rows) == CHUNK


def _apply(rows: list[dict[str, Any]]) -> None:
    sums: dict[Key, _Sums] = {}
    for row in rows:
        sums.setdefault(_key(row), _Sums()).add(row)
    for (hour, agent_key, backend, model), add in sums.items():
        rollup, _ = UsageRollup.objects.select_for_update().get_or_create(
            hour=hour, agent_key=agent_key, backend=backend, model=model
        )
        for name, value in add.counts.items():
            setattr(rollup, name, getattr(rollup, name) + value)
        rollup.cost_usd += add.cost
        rollup.ttfb_histogram = histogram_merge(list(rollup.ttfb_histogram), add.histogram)
        if add.agent_name:
            rollup.agent_name = add.agent_name
        rollup.save()


def usage_rolled_up_at() -> datetime | None:
    """When the rollups last took in new rows (None before the first run)."""
    return UsageCursor.objects.filter(name=CURSOR).values_list("updated_at", flat=True).first()
