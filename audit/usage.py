"""Reading usage: the rollups (audit/rollups.py) summed over a time range, grouped by any of
agent, backend, model, day and hour (UTC). One reader for the admin API, the agent API, the
page and ``manage.py usage``.

Agents are told apart by id, not by name: a name is free again after its agent unenrolls,
and the next agent of that name starts with none of the first one's usage. Each agent group
shows the agent's name and whether it is still enrolled.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Q
from django.utils import timezone

from audit.models import UsageRollup
from audit.rollups import BUCKETS, histogram_merge, percentile_ms, usage_rolled_up_at
from audit.selectors import FILTER_TEXT_LIMIT, audit_time_parse
from broker.infra.errors import ServiceError
from broker.models import Agent, AgentStatus

GROUPS = ("agent", "backend", "model", "day", "hour")
DEFAULT_SINCE = "7d"
# A range longer than this is refused: retention keeps 90 days by default, rollups stay.
MAX_RANGE = timedelta(days=400)
COUNTS = (
    "calls", "errors", "refusals", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens",
)  # fmt: skip


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class UsageQuery:
    """What to sum and how to group it. Times are whole UTC hours: ``since`` is rounded
    down to its hour, ``until`` up, as the rollups count by hour."""

    since: datetime
    until: datetime
    group_by: tuple[str, ...] = ()
    agent: str = ""  # an agent id, or a name (every agent that had it)
    agent_ids: tuple[str, ...] | None = None  # set by the agent API: only these agents
    backend: str = ""
    model: str = ""

    @classmethod
    def parse(cls, params: Mapping[str, Any], *, now: datetime | None = None) -> UsageQuery:
        """From query parameters or CLI options; a bad value is a ServiceError naming it."""
        now = now or timezone.now()
        texts: dict[str, str] = {}
        for name in ("since", "until", "group_by", "agent", "backend", "model"):
            raw = params.get(name)
            if raw in (None, ""):
                continue
            if not isinstance(raw, str):
                raise ServiceError("a string", name)
            if len(raw) > FILTER_TEXT_LIMIT:
                raise ServiceError(f"at most {FILTER_TEXT_LIMIT} characters", name)
            texts[name] = raw.strip()
        since = audit_time_parse(texts.get("since", DEFAULT_SINCE), name="since", now=now)
        until = audit_time_parse(texts["until"], name="until", now=now) if "until" in texts else now
        if until <= since:
            raise ServiceError("must be after since", "until")
        if until - since > MAX_RANGE:
            raise ServiceError(f"a range of at most {MAX_RANGE.days} days", "since")
        group_by: list[str] = []
        for part in texts.get("group_by", "").split(","):
            part = part.strip()
            if not part:
                continue
            if part not in GROUPS:
                raise ServiceError(
                    f"any of {', '.join(GROUPS)}, comma-separated; not {part!r}", "group_by"
                )
            if part not in group_by:
                group_by.append(part)
        if "day" in group_by and "hour" in group_by:
            raise ServiceError("day or hour, not both", "group_by")
        end = _hour(until)
        try:
            end = end if end == until else end + timedelta(hours=1)
        except OverflowError:
            raise ServiceError("a time before the year 9999 ends", "until") from None
        return cls(
            since=_hour(since),
            until=end,
            group_by=tuple(group_by),
            agent=texts.get("agent", ""),
            backend=texts.get("backend", ""),
            model=texts.get("model", ""),
        )


@dataclass
class Totals:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    cost: Decimal = Decimal(0)
    cost_unknown: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def add(self, rollup: UsageRollup) -> None:
        for name in COUNTS:
            self.counts[name] += getattr(rollup, name)
        self.cost += rollup.cost_usd
        self.cost_unknown += rollup.cost_unknown
        histogram_merge(self.histogram, rollup.ttfb_histogram)

    def as_json(self) -> dict[str, Any]:
        return {
            **self.counts,
            # A decimal string, as the API gives every amount of dollars; the calls whose
            # cost is unknown are counted apart and never summed as 0.
            "cost_usd": f"{self.cost.quantize(Decimal('0.000001'))}",
            "cost_unknown_calls": self.cost_unknown,
            "ttfb_p50_ms": percentile_ms(self.histogram, 0.50),
            "ttfb_p95_ms": percentile_ms(self.histogram, 0.95),
        }


def _agent_filter(text: str) -> Q:
    """An id names one agent; a name every agent that had it, then or now."""
    try:
        return Q(agent_key=str(uuid.UUID(text)))
    except ValueError:
        ids = [str(pk) for pk in Agent.objects.filter(name=text).values_list("pk", flat=True)]
        return Q(agent_key__in=ids) | Q(agent_name=text)


def usage_rollups(query: UsageQuery) -> Iterable[UsageRollup]:
    rollups = UsageRollup.objects.filter(hour__gte=query.since, hour__lt=query.until)
    if query.agent_ids is not None:
        rollups = rollups.filter(agent_key__in=query.agent_ids)
    if query.agent:
        rollups = rollups.filter(_agent_filter(query.agent))
    if query.backend:
        rollups = rollups.filter(backend=query.backend)
    if query.model:
        rollups = rollups.filter(model=query.model)
    return rollups.order_by("hour").iterator(chunk_size=2000)


def _group_key(rollup: UsageRollup, group_by: tuple[str, ...]) -> tuple[str, ...]:
    values = {
        "agent": rollup.agent_key,
        "backend": rollup.backend,
        "model": rollup.model,
        "day": rollup.hour.astimezone(UTC).date().isoformat(),
        "hour": rollup.hour.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }
    return tuple(values[name] for name in group_by)


def _agents(keys: Iterable[str], names: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each agent's current name and status; the recorded name for an agent whose row is
    gone (or for calls no agent was known for)."""
    ids = [key for key in keys if key]
    found = {str(a.pk): a for a in Agent.objects.filter(pk__in=ids).only("name", "status")}
    agents: dict[str, dict[str, Any]] = {}
    for key in keys:
        agent = found.get(key)
        agents[key] = {
            "agent_id": key or None,
            "agent": agent.name if agent is not None else names.get(key, ""),
            "agent_status": agent.status if agent is not None else None,
        }
    return agents


def usage_report(query: UsageQuery) -> dict[str, Any]:
    """The totals of the range and one entry per group, biggest first for agent, backend and
    model groups, in time order when grouped by day or hour."""
    groups: dict[tuple[str, ...], Totals] = {}
    total = Totals()
    names: dict[str, str] = {}
    for rollup in usage_rollups(query):
        groups.setdefault(_group_key(rollup, query.group_by), Totals()).add(rollup)
        total.add(rollup)
        if rollup.agent_name:
            names[rollup.agent_key] = rollup.agent_name
    agents = (
        _agents({key[query.group_by.index("agent")] for key in groups}, names)
        if "agent" in query.group_by
        else {}
    )
    rows = []
    for key, totals in groups.items():
        row: dict[str, Any] = {}
        for name, value in zip(query.group_by, key, strict=True):
            if name == "agent":
                row.update(agents[value])
            else:
                row[name] = value
        row.update(totals.as_json())
        rows.append(row)
    rows.sort(key=lambda row: -row["calls"])
    for name in ("hour", "day"):
        if name in query.group_by:
            rows.sort(key=lambda row, name=name: row[name])  # type: ignore[misc]
    rolled_up_at = usage_rolled_up_at()
    return {
        "since": query.since.isoformat().replace("+00:00", "Z"),
        "until": query.until.isoformat().replace("+00:00", "Z"),
        "group_by": list(query.group_by),
        "rolled_up_at": rolled_up_at.isoformat() if rolled_up_at else None,
        "totals": total.as_json(),
        "groups": rows,
    }


def agent_label(row: Mapping[str, Any]) -> str:
    """How the page and the command name an agent group: its name, marked when the agent
    is gone, so two agents of one name never read as one."""
    name = row.get("agent") or "(no agent)"
    if row.get("agent_status") == AgentStatus.UNENROLLED:
        return f"{name} (unenrolled, {str(row.get('agent_id'))[:8]})"
    return str(name)
