"""How should the proxy hand an audit event off the request path? A rough measurement.

    .venv/bin/python -m bench.audit_recorder [--events 20000]

Uses a throwaway data directory: SQLite and the embedded Redis, or DATABASE_URL and
REDIS_URL when set (the database must exist; it is migrated). Measures, on one event loop:

1. the request path: event-loop time per event to hand it off, for the in-process buffer
   (``audit_enqueue``), a Redis stream (``XADD``, awaited: what a request would wait for),
   and a Celery task (``send_task``: a synchronous publish to Redis);
2. the write: events per second into the database as the recorder writes them (batches of
   500) and as a per-event consumer would (one INSERT each);
3. the feed: time from ``audit_enqueue`` to a channel-layer receiver in the activity group.

Numbers are for comparing the choices on one machine, not for any test. The decision and
the numbers it rests on are in docs/decisions.md ("Audit").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE = {
    "method": "POST", "path": "/v1/messages", "status": 200, "outcome": "ok",
    "duration_ms": 812.4, "ttfb_ms": 402.1, "request_id": "req_011CTm5R8sUwS1cqSGA7xCfx",
    "model": "claude-sonnet-4-5", "system_prompt": True, "streamed": True,
    "input_tokens": 1204, "output_tokens": 388, "cache_read_tokens": 0,
    "cache_write_tokens": 0, "stop_reason": "end_turn", "policy_result": "allowed",
    "policy_reason": "", "token_id": "7d0c2c4e-46a4-4bd5-9b83-4c1a8b1cbb1e",
    "token": "crd_AbCdEfGh",
}  # fmt: skip


def _setup() -> subprocess.Popen[bytes] | None:
    data_dir = Path(tempfile.mkdtemp(prefix="kbbench-audit-"))
    os.environ["KEYBROKER_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("KEYBROKER_REDIS_PREFIX", f"kbbench{os.getpid()}")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.project.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    redis_process = None
    if settings.REDIS_EMBEDDED:
        from broker.runtime.embedded_redis import start_embedded_redis

        redis_process = start_embedded_redis(
            data_dir=settings.DATA_DIR, socket_path=settings.REDIS_SOCKET, stdout=subprocess.DEVNULL
        )
    call_command("migrate", verbosity=0)
    return redis_process


def _per_event_us(seconds: float, count: int) -> float:
    return seconds / count * 1e6


async def hot_path(events: int) -> dict[str, float]:
    from django.conf import settings
    from django.utils import timezone
    from redis import asyncio as aioredis

    from audit import recorder
    from audit.events import PROXY_COLUMNS, event_row
    from audit.models import AuditEvent
    from broker.celery import app as celery_app

    results: dict[str, float] = {}

    started = time.perf_counter()
    for _ in range(events):
        recorder.audit_enqueue(action="proxy.request", agent="bob", backend="anthropic",
                               address="10.0.0.1", **SAMPLE)  # fmt: skip
    results["in-process buffer (audit_enqueue)"] = _per_event_us(
        time.perf_counter() - started, events
    )
    await recorder.audit_flush()  # measured separately below

    row = event_row(created_at=timezone.now(), action="proxy.request", actor_type="agent",
                    actor="bob", agent="bob", backend="anthropic", address="10.0.0.1",
                    message="", fields=dict(SAMPLE), columns=PROXY_COLUMNS)  # fmt: skip
    started = time.perf_counter()
    for _ in range(events):
        AuditEvent(**row)
    results["  (building a model instance instead of a row)"] = _per_event_us(
        time.perf_counter() - started, events
    )

    stream_key = f"{settings.REDIS_KEY_PREFIX}:bench:audit"
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    payload = json.dumps({**row, "created_at": row["created_at"].isoformat()})
    count = min(events, 5000)
    started = time.perf_counter()
    for _ in range(count):
        await client.xadd(stream_key, {"e": payload})
    results["Redis stream (XADD per event, awaited)"] = _per_event_us(
        time.perf_counter() - started, count
    )
    await client.delete(stream_key)
    await client.aclose()

    count = min(events, 2000)
    started = time.perf_counter()
    for _ in range(count):
        celery_app.send_task("audit.bench_write", args=[payload], queue="kbbench-audit")
    results["Celery task (send_task per event, blocks the loop)"] = _per_event_us(
        time.perf_counter() - started, count
    )
    with celery_app.connection_for_write() as connection:
        connection.default_channel.queue_purge("kbbench-audit")
    return results


async def writes(events: int) -> dict[str, float]:
    from django.utils import timezone

    from audit import recorder
    from audit.events import PROXY_COLUMNS, event_row
    from audit.models import AuditEvent
    from broker.infra.db import db_call

    results: dict[str, float] = {}
    for _ in range(events):
        recorder.audit_enqueue(action="proxy.request", agent="bob", backend="anthropic", **SAMPLE)
    started = time.perf_counter()
    await recorder.audit_flush()
    results["recorder: bulk INSERT, batches of 500"] = events / (time.perf_counter() - started)

    count = min(events, 2000)
    rows = [
        event_row(created_at=timezone.now(), action="proxy.request", actor_type="agent",
                  actor="bob", agent="bob", backend="anthropic", address=None, message="",
                  fields=dict(SAMPLE), columns=PROXY_COLUMNS)
        for _ in range(count)
    ]  # fmt: skip

    def one_by_one() -> None:
        for row in rows:
            AuditEvent.objects.create(**row)

    started = time.perf_counter()
    await db_call(one_by_one)()
    results["per-event consumer: one INSERT each"] = count / (time.perf_counter() - started)
    return results


async def feed_latency(samples: int) -> list[float]:
    from channels.layers import get_channel_layer

    from audit import recorder
    from audit.publish import ACTIVITY_GROUP

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(ACTIVITY_GROUP, channel)
    delays = []
    for number in range(samples):
        await asyncio.sleep(random.uniform(0, 0.25))  # land anywhere in the flush interval
        started = time.perf_counter()
        recorder.audit_enqueue(action="proxy.request", agent="bob", request_id=f"lat{number}")
        while True:
            message = await layer.receive(channel)
            if any(e["request_id"] == f"lat{number}" for e in message["events"]):
                break
        delays.append((time.perf_counter() - started) * 1000)
    await layer.group_discard(ACTIVITY_GROUP, channel)
    return delays


async def main(events: int, samples: int) -> None:
    from django.db import connection

    print(f"database: {connection.vendor}; events: {events}")
    print("\n| hand-off on the request path | µs per event |\n|---|---:|")
    for name, value in (await hot_path(events)).items():
        print(f"| {name} | {value:.1f} |")
    print("\n| write into the database | events/s |\n|---|---:|")
    for name, value in (await writes(events)).items():
        print(f"| {name} | {value:,.0f} |")
    delays = sorted(await feed_latency(samples))
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    print(
        f"\nfeed: enqueue → group receiver, {samples} samples: "
        f"p50 {statistics.median(delays):.0f} ms, p99 {p99:.0f} ms, max {delays[-1]:.0f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=60)
    args = parser.parse_args()
    redis_process = _setup()
    try:
        asyncio.run(main(args.events, args.samples))
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=10)
    sys.exit(0)
