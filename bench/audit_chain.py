"""What does the hash chain cost the audit recorder's batch write? A rough measurement.

    .venv/bin/python -m bench.audit_chain [--batches 40]

Same setup as bench/audit_recorder.py (a throwaway data directory: SQLite, or DATABASE_URL
when set; the database must exist and is migrated). Writes batches of 500 proxied-call rows
as the recorder did before the chain (one bulk INSERT) and as it does now (``chain_write``:
lock the head, hash each row, bulk INSERT, move the head), alternating so both see the same
table sizes, and times ``chain_verify`` over everything written. Numbers are for comparing
on one machine, not for any test; docs/decisions.md quotes them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.audit_recorder import SAMPLE, _setup

BATCH = 500


def measure(batches: int) -> None:
    from django.db import connection, transaction
    from django.utils import timezone

    from audit.chain import chain_verify, chain_write
    from audit.events import PROXY_COLUMNS, event_row
    from audit.models import AuditEvent

    def rows() -> list[dict[str, object]]:
        return [
            event_row(created_at=timezone.now(), action="proxy.request", actor_type="agent",
                      actor="bob", agent="bob", backend="anthropic", address="10.0.0.1",
                      message="", fields=dict(SAMPLE), columns=PROXY_COLUMNS)
            for _ in range(BATCH)
        ]  # fmt: skip

    def plain(batch: list[dict[str, object]]) -> None:
        with transaction.atomic():
            AuditEvent.objects.bulk_create([AuditEvent(**row) for row in batch])

    timings: dict[str, list[float]] = {"bulk INSERT (before)": [], "chain_write (now)": []}
    for _ in range(batches):
        for name, write in (("bulk INSERT (before)", plain), ("chain_write (now)", chain_write)):
            batch = rows()
            started = time.perf_counter()
            write(batch)
            timings[name].append((time.perf_counter() - started) * 1000)
    print(f"database: {connection.vendor}; {batches} batches of {BATCH} each way")
    print("\n| batch of 500 | median ms | events/s |\n|---|---:|---:|")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {BATCH / median * 1000:,.0f} |")

    # Unchained rows from the "before" writes are set aside so verify walks the chain only.
    chained = AuditEvent.objects.filter(chain_seq__isnull=False).count()
    started = time.perf_counter()
    result = chain_verify()
    elapsed = time.perf_counter() - started
    print(f"\nverify: {chained:,} chained events in {elapsed:.2f} s "
          f"({chained / elapsed:,.0f} events/s); {len(result.breaks)} break(s) reported "
          "(the unchained 'before' rows, as inserted)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    redis_process = _setup()
    try:
        measure(args.batches)
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=10)
    sys.exit(0)
