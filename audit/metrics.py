"""The proxied-call metrics, counted from the audit rows as the recorder writes them
(docs/metrics.md; the choices in docs/decisions.md, "Metrics"). ``GET /metrics`` is in
audit/metrics_view.py.

Counting rows rather than requests keeps the proxy's request path free of metric work: a
batch of rows is counted in the recorder's writer thread after it is written, so the
metrics say exactly what the audit trail holds, spilled rows included once replayed.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from broker.infra.metrics import call_metrics, histogram_observe_many

logger = logging.getLogger(__name__)

CALL_ACTIONS = frozenset({"proxy.request", "policy.denied"})
TOKEN_KINDS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_read_tokens", "cache_read"),
    ("cache_write_tokens", "cache_write"),
)
# A refusal that no policy rule names, by its status: what kind of check said no.
REFUSED_BY_STATUS = {
    400: "request",
    401: "credential",
    403: "access",
    404: "not_found",
    413: "request",
    429: "rate_limit",
    503: "overloaded",
}

Labels = tuple[str, ...]


def calls_observe(rows: Iterable[Mapping[str, Any]]) -> None:
    """Count the proxied calls among ``rows`` (audit rows just written). Never raises: a
    metric must not fail the write that the audit trail depends on."""
    try:
        _observe(rows)
    except Exception:
        logger.exception("metrics: a batch of audit rows could not be counted")


def _observe(rows: Iterable[Mapping[str, Any]]) -> None:
    metrics = call_metrics()
    calls: Counter[Labels] = Counter()
    refusals: Counter[Labels] = Counter()
    tokens: Counter[Labels] = Counter()
    costs: defaultdict[Labels, float] = defaultdict(float)
    durations: defaultdict[Labels, list[float]] = defaultdict(list)
    ttfbs: defaultdict[Labels, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("action") not in CALL_ACTIONS:
            continue
        backend = row.get("backend") or ""
        agent: Labels = (row.get("agent") or "",) if metrics.agent_label else ()
        status = row.get("status")
        outcome = row.get("outcome") or ""
        calls[(backend, str(status) if status else "none", outcome, *agent)] += 1
        if outcome == "denied":
            refusals[(backend, _refusal_rule(row), *agent)] += 1
        if row.get("duration_ms") is not None:
            durations[(backend, *agent)].append(row["duration_ms"] / 1000)
        if row.get("ttfb_ms") is not None:
            ttfbs[(backend, *agent)].append(row["ttfb_ms"] / 1000)
        # Only upstream-reported usage carries a model label: a refused call's model is
        # whatever the client wrote, and must not mint a series per made-up name.
        model = row.get("model") or ""
        for column, kind in TOKEN_KINDS:
            if row.get(column):
                tokens[(backend, model, kind, *agent)] += row[column]
        if row.get("cost_usd") is not None:
            costs[(backend, model, *agent)] += float(row["cost_usd"])
    for labels, count in calls.items():
        metrics.calls.labels(*labels).inc(count)
    for labels, count in refusals.items():
        metrics.refusals.labels(*labels).inc(count)
    for labels, count in tokens.items():
        metrics.tokens.labels(*labels).inc(count)
    for labels, usd in costs.items():
        metrics.cost.labels(*labels).inc(usd)
    for labels, amounts in durations.items():
        histogram_observe_many(metrics.duration.labels(*labels), amounts)
    for labels, amounts in ttfbs.items():
        histogram_observe_many(metrics.ttfb.labels(*labels), amounts)


def _refusal_rule(row: Mapping[str, Any]) -> str:
    rule = (row.get("detail") or {}).get("policy_rule")
    if isinstance(rule, str) and rule:
        return rule
    return REFUSED_BY_STATUS.get(row.get("status") or 0, "other")
