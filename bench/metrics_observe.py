"""What do the proxied-call metrics cost per call? A rough measurement.

    .venv/bin/python -m bench.metrics_observe [--rows 50000]

Counts audit rows as the recorder does after each batch write (``calls_observe``, batches
of 500, in the writer thread), and, for comparison, one row at a time as a per-request
update on the event loop would, each with prometheus_client in memory (one process) and
in multiprocess mode (a PROMETHEUS_MULTIPROC_DIR of mmapped files, as `serve` runs it).
prometheus_client picks its mode when first imported, so each mode runs in a child
process. No database or Redis is touched. Numbers are for comparing choices on one
machine, not for any test; the decision is in docs/decisions.md ("Metrics").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

BATCH = 500


def _rows(count: int) -> list[dict[str, Any]]:
    from django.utils import timezone

    from audit.events import PROXY_COLUMNS, event_row

    rows = []
    for index in range(count):
        refused = index % 20 == 0
        fields: dict[str, Any] = {
            "method": "POST", "path": "/v1/messages", "status": 403 if refused else 200,
            "outcome": "denied" if refused else "ok", "duration_ms": 5.0 + index % 900,
            "ttfb_ms": None if refused else 2.0 + index % 400,
            "model": ("claude-haiku-4-5", "claude-sonnet-4-5")[index % 2],
            "input_tokens": None if refused else 1204, "output_tokens": None if refused else 388,
            "cache_read_tokens": None if refused else 0, "cost_usd": None,
        }  # fmt: skip
        if refused:
            fields["policy_rule"] = "models"
        rows.append(
            event_row(
                created_at=timezone.now(),
                action="policy.denied" if refused else "proxy.request",
                actor_type="agent",
                actor=f"agent-{index % 50}",
                agent=f"agent-{index % 50}",
                backend=("anthropic", "anthropic-staging")[index % 2],
                address="10.0.0.7",
                message="",
                fields=fields,
                columns=PROXY_COLUMNS,
            )
        )
    return rows


def _measure(count: int) -> dict[str, float]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.project.settings")
    os.environ["KEYBROKER_DATA_DIR"] = tempfile.mkdtemp(prefix="kbbench-metrics-")
    import django

    django.setup()
    from audit.metrics import calls_observe

    rows = _rows(count)
    calls_observe(rows[:BATCH])  # defines the metrics and their first series
    started = time.perf_counter()
    for start in range(0, count, BATCH):
        calls_observe(rows[start : start + BATCH])
    batched = (time.perf_counter() - started) / count
    started = time.perf_counter()
    for row in rows:
        calls_observe([row])
    one_by_one = (time.perf_counter() - started) / count
    return {"batched_us": batched * 1e6, "one_by_one_us": one_by_one * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.rows)))
        return
    for mode in ("in memory (one process)", "multiprocess (mmapped files)"):
        env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
        if mode.startswith("multiprocess"):
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="kbbench-prom-")
        out = subprocess.run(
            [sys.executable, "-m", "bench.metrics_observe", "--child", "--rows", str(args.rows)],
            env=env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        print(
            f"{mode}: {result['batched_us']:.1f} µs per call counted in batches of {BATCH}, "
            f"{result['one_by_one_us']:.1f} µs one at a time"
        )


if __name__ == "__main__":
    main()
