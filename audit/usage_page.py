"""The usage page: ``/usage/`` (staff allowed to view audit events), linked from the index.

Charts of calls, tokens and cost over time by agent and by model, the top agents, error and
refusal rates and a budget bar per grant, drawn by Chart.js (served from the project's own
static files, never a CDN). Everything comes from the rollups through audit/usage.py; the
budget bars read what the proxy counts in Redis, as ``GET /v1/status`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from audit.selectors import audit_viewer
from audit.usage import UsageQuery, agent_label, usage_report
from broker.infra.errors import ServiceError
from broker.models import AgentStatus, Grant
from broker.selectors.policy import policy_left
from broker.services.policy import grant_policy

RANGES = {"24h": "last 24 hours", "7d": "last 7 days", "30d": "last 30 days"}
DEFAULT_RANGE = "7d"
# Ranges up to this long are charted by hour, longer ones by day.
HOURLY_UP_TO = timedelta(hours=48)
# Series per chart; the rest are summed as "others".
SERIES = 8
METRICS = ("calls", "tokens", "cost")
FILTERS = ("agent", "backend", "model")


def _metric(row: Mapping[str, Any], metric: str) -> float:
    if metric == "tokens":
        return float(
            row["input_tokens"]
            + row["output_tokens"]
            + row["cache_read_tokens"]
            + row["cache_write_tokens"]
        )
    if metric == "cost":
        return float(Decimal(row["cost_usd"]))
    return float(row[metric])


def _buckets(query: UsageQuery, step: str) -> list[str]:
    """Every hour or day of the range, so quiet ones show as zero."""
    labels = []
    moment = query.since
    while moment < query.until:
        if step == "hour":
            labels.append(moment.isoformat().replace("+00:00", "Z"))
            moment += timedelta(hours=1)
        else:
            day = moment.date().isoformat()
            if not labels or labels[-1] != day:
                labels.append(day)
            moment += timedelta(hours=1)
    return labels


def _series(
    rows: Iterable[Mapping[str, Any]], labels: list[str], step: str, by: str
) -> dict[str, list[dict[str, Any]]]:
    """Per metric, one dataset per agent (or model): the biggest by calls, then "others"."""
    rows = list(rows)

    def key_of(row: Mapping[str, Any]) -> str:
        return str(row["agent_id"] or "") if by == "agent" else str(row[by])

    def name_of(row: Mapping[str, Any]) -> str:
        return agent_label(row) if by == "agent" else str(row[by] or "(none)")

    calls: dict[str, float] = {}
    names: dict[str, str] = {}
    for row in rows:
        calls[key_of(row)] = calls.get(key_of(row), 0) + row["calls"]
        names[key_of(row)] = name_of(row)
    top = sorted(calls, key=lambda key: -calls[key])[:SERIES]
    index = {label: i for i, label in enumerate(labels)}
    series: dict[str, list[dict[str, Any]]] = {}
    for metric in METRICS:
        data = {key: [0.0] * len(labels) for key in top}
        others = [0.0] * len(labels)
        for row in rows:
            at = index.get(row[step])
            if at is None:
                continue
            target = data.get(key_of(row), others)
            target[at] += _metric(row, metric)
        datasets = [{"label": names[key], "data": data[key]} for key in top]
        if any(others):
            datasets.append({"label": "others", "data": others})
        series[metric] = datasets
    return series


def _rates(rows: Iterable[Mapping[str, Any]], labels: list[str], step: str) -> dict[str, Any]:
    by_time = {row[step]: row for row in rows}
    errors, refusals = [], []
    for label in labels:
        row = by_time.get(label)
        calls = row["calls"] if row else 0
        errors.append(round(100 * row["errors"] / calls, 1) if row and calls else None)
        refusals.append(round(100 * row["refusals"] / calls, 1) if row and calls else None)
    return {"errors": errors, "refusals": refusals}


def _budget(entry: Mapping[str, Any] | None, usd: bool) -> dict[str, Any] | None:
    if entry is None:
        return None
    limit = float(Decimal(entry["limit"])) if usd else float(entry["limit"])
    used = entry["used"]
    used_value = None if used is None else (float(Decimal(used)) if usd else float(used))
    return {
        "limit": entry["limit"],
        "used": used,
        "percent": None
        if used_value is None or not limit
        else min(100.0, round(100 * used_value / limit, 1)),
    }


def grant_budgets(*, agent: str = "", backend: str = "") -> list[dict[str, Any]]:
    """Each approved agent's grants that have a token or USD budget: used against limit."""
    grants = Grant.objects.select_related("agent", "backend").filter(
        agent__status=AgentStatus.APPROVED
    )
    if agent:
        grants = grants.filter(agent__name=agent)
    if backend:
        grants = grants.filter(backend__name=backend)
    budgets = []
    for grant in grants.order_by("agent__name", "backend__name"):
        policy = grant_policy(grant)
        if policy.daily_tokens is None and not policy.counts_usd:
            continue
        left = policy_left(policy)
        bars = {
            "daily_tokens": _budget(left["daily_tokens"], usd=False),
            "daily_usd": _budget(left["daily_usd"], usd=True),
            "monthly_usd": _budget(left["monthly_usd"], usd=True),
        }
        budgets.append(
            {
                "agent": grant.agent.name,
                "backend": grant.backend.name,
                "bars": [{"name": name, **bar} for name, bar in bars.items() if bar is not None],
            }
        )
    return budgets


def _moment(text: str | None) -> str:
    return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M:%S") if text else "(not yet)"


def usage_page_data(params: Mapping[str, str], *, now: datetime) -> dict[str, Any]:
    """What the page draws, for the filters given (a bad one is a ServiceError)."""
    chosen = params.get("range") or DEFAULT_RANGE
    if chosen not in RANGES:
        raise ServiceError(f"one of {', '.join(RANGES)}", "range")
    filters = {name: params.get(name, "").strip() for name in FILTERS}
    base = {"since": chosen, **filters}
    query = UsageQuery.parse(base, now=now)
    step = "hour" if query.until - query.since <= HOURLY_UP_TO + timedelta(hours=1) else "day"

    def report(group_by: str, **narrow: str) -> dict[str, Any]:
        return usage_report(UsageQuery.parse({**base, **narrow, "group_by": group_by}, now=now))

    labels = _buckets(query, step)
    by_agent_time = report(f"{step},agent")["groups"]
    by_model_time = report(f"{step},model")["groups"]
    by_time = report(step)["groups"]
    agents = report("agent")
    # The pickers offer what the range holds, whatever the other filters say.
    held = usage_report(UsageQuery.parse({"since": chosen, "group_by": ",".join(FILTERS)}, now=now))
    return {
        "range": chosen,
        "filters": filters,
        "step": step,
        "since": agents["since"],
        "until": agents["until"],
        "rolled_up_at": agents["rolled_up_at"],
        "rolled_up_text": _moment(agents["rolled_up_at"]),
        "labels": labels,
        "by_agent": _series(by_agent_time, labels, step, "agent"),
        "by_model": _series(by_model_time, labels, step, "model"),
        "rates": _rates(by_time, labels, step),
        "totals": agents["totals"],
        "top_agents": [{**row, "label": agent_label(row)} for row in agents["groups"]],
        "budgets": grant_budgets(agent=filters["agent"], backend=filters["backend"]),
        "choices": {
            name: sorted({str(row.get(name) or "") for row in held["groups"]} - {""})
            for name in FILTERS
        },
    }


@staff_member_required
def usage(request: HttpRequest) -> HttpResponse:
    if not audit_viewer(request.user):
        raise PermissionDenied("you need the audit.view_auditevent permission")
    now = datetime.now(UTC)
    error = ""
    try:
        data = usage_page_data(request.GET.dict(), now=now)
    except ServiceError as exc:
        error = exc.message
        data = usage_page_data({}, now=now)
    context = {
        **admin.site.each_context(request),
        "title": "Usage",
        "is_nav_sidebar_enabled": False,
        "kb_usage": data,
        "kb_error": error,
        "kb_ranges": RANGES,
    }
    return render(request, "usage.html", context, status=400 if error else 200)
