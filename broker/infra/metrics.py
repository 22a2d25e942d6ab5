"""The Prometheus metrics every process updates and ``GET /metrics`` serves (docs/metrics.md).

With ``PROMETHEUS_MULTIPROC_DIR`` set (``serve`` sets it for its children), prometheus_client
keeps each process's values in files in that directory, and a scrape of any web process
adds up those of every process on the machine: the uvicorn workers and the Celery worker.
Without it, each process counts in memory and a scrape sees its own values only, which is
right for one process and wrong for several. prometheus_client reads the variable when it
is first imported, so it must be in the environment before the process starts.

The per-call metrics are updated by the audit recorder as it writes each batch (audit/
metrics.py), never on the proxy's request path; their label names are fixed when first
used, from ``KEYBROKER_METRICS_AGENT_LABEL``.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Where `serve` keeps the per-process files when the operator names no directory.
MULTIPROC_DIRNAME = "metrics"
# Read once, as prometheus_client does when it is imported (just below): the mode this
# process counts in, whatever the environment says later.
MULTIPROC_DIR = os.environ.get(MULTIPROC_ENV) or None

# This process's metrics; a scrape in multiprocess mode reads the files instead.
LOCAL = CollectorRegistry(auto_describe=True)

INF = float("inf")
# Seconds. A proxied call lasts from milliseconds (a refusal) to many minutes (a long
# stream; the idle timeout is 600 s), and its first byte comes after the model starts.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, INF)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, INF)

AUDIT_QUEUE = Gauge(
    "keybroker_audit_queue_depth",
    "Audit events queued in memory or being written, summed over live processes.",
    multiprocess_mode="livesum",
    registry=LOCAL,
)
AUDIT_SPILLED = Counter(
    "keybroker_audit_spilled_events",
    "Audit events written to the spill file (buffer full, or a shutdown that could not write).",
    registry=LOCAL,
)
AUDIT_REPLAYED = Counter(
    "keybroker_audit_replayed_events",
    "Spilled audit events written into the database later.",
    registry=LOCAL,
)
AUDIT_WRITE_FAILURES = Counter(
    "keybroker_audit_write_failures",
    "Audit batch writes that failed and were kept for a retry (database down).",
    registry=LOCAL,
)
AUDIT_REJECTED = Counter(
    "keybroker_audit_rejected_events",
    "Audit events the database refused outright, kept in audit-rejected.jsonl.",
    registry=LOCAL,
)
CELERY_TASKS = Counter(
    "keybroker_celery_tasks",
    "Celery tasks run, by task name and outcome (success, failure, retry).",
    ["task", "outcome"],
    registry=LOCAL,
)


@dataclass(frozen=True)
class CallMetrics:
    """The per-call metrics; with ``agent_label`` each takes the agent's name last."""

    agent_label: bool
    calls: Counter
    refusals: Counter
    duration: Histogram
    ttfb: Histogram
    tokens: Counter
    cost: Counter


@functools.cache
def call_metrics() -> CallMetrics:
    """Defined on first use: the agent label follows the settings of the process."""
    agent: tuple[str, ...] = ("agent",) if settings.METRICS_AGENT_LABEL else ()
    return CallMetrics(
        agent_label=bool(agent),
        calls=Counter(
            "keybroker_proxy_calls",
            "Proxied calls, as the audit trail holds them: by backend, status and outcome.",
            ["backend", "status", "outcome", *agent],
            registry=LOCAL,
        ),
        refusals=Counter(
            "keybroker_proxy_refusals",
            "Proxied calls keybroker refused, by the policy rule (or the check) that refused.",
            ["backend", "rule", *agent],
            registry=LOCAL,
        ),
        duration=Histogram(
            "keybroker_proxy_duration_seconds",
            "Proxied calls' total duration, from the request to the answer's last byte.",
            ["backend", *agent],
            buckets=DURATION_BUCKETS,
            registry=LOCAL,
        ),
        ttfb=Histogram(
            "keybroker_proxy_ttfb_seconds",
            "Time to the first byte of the upstream's answer, for calls that got one.",
            ["backend", *agent],
            buckets=TTFB_BUCKETS,
            registry=LOCAL,
        ),
        tokens=Counter(
            "keybroker_proxy_tokens",
            "Tokens the upstream reported, by backend, model and kind "
            "(input, output, cache_read, cache_write).",
            ["backend", "model", "kind", *agent],
            registry=LOCAL,
        ),
        cost=Counter(
            "keybroker_proxy_cost_usd",
            "What proxied calls cost in USD at the price tables' prices (unpriced calls add 0).",
            ["backend", "model", *agent],
            registry=LOCAL,
        ),
    )


def histogram_observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe`` for each of ``amounts``, with one write per bucket touched
    instead of two per amount: in multiprocess mode each write is a locked mmap update
    (~1 µs), which made a batch of calls cost ~20 µs each (docs/decisions.md, "Metrics").
    Uses the child's buckets as ``observe`` does; tests/test_metrics.py holds it to
    ``observe``'s result."""
    if not amounts:
        return
    counts = [0] * len(histogram._upper_bounds)
    for amount in amounts:
        counts[bisect.bisect_left(histogram._upper_bounds, amount)] += 1
    histogram._sum.inc(math.fsum(amounts))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


def metrics_dir_reset(directory: Path) -> None:
    """The directory for the per-process files, without any from an earlier run:
    prometheus_client asks for it wiped before the processes start, or the live gauges of
    dead processes would still be summed. Only its own ``*.db`` files are removed, whatever
    else an operator keeps there."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for file in directory.glob("*.db"):
        file.unlink(missing_ok=True)


def metrics_process_exit() -> None:
    """Drop this process's live gauges (the audit queue) from the sum; counters stay."""
    if MULTIPROC_DIR is not None:
        mark_process_dead(os.getpid(), MULTIPROC_DIR)  # type: ignore[no-untyped-call]


class _Local(Collector):
    def collect(self) -> Iterable[Any]:
        return LOCAL.collect()


def metrics_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """What a scrape reads: every process's files (or this process's values), and
    ``extra`` collectors that read their values at scrape time."""
    # Not auto-described: that would run each collector (a query) once more to register it.
    registry = CollectorRegistry()
    if MULTIPROC_DIR is not None:
        MultiProcessCollector(registry, path=MULTIPROC_DIR)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Local())
    for collector in extra:
        registry.register(collector)
    return registry
