"""Held calls waiting for a person's decision (broker/services/held.py has their records)."""

from __future__ import annotations

import time

import redis

from broker.infra.errors import Unavailable
from broker.infra.redis import redis_client, redis_key
from broker.services.held import (
    HELD_INDEX,
    KEEP_SECONDS,
    HeldCall,
    decision_key,
    held_key,
)


def held_calls_waiting() -> list[HeldCall]:
    """Every held call, in every process, that nobody decided yet and whose deadline is
    ahead; oldest first. Entries of holds long over (a process that died) are pruned."""
    client = redis_client()
    index = redis_key(HELD_INDEX)
    now = time.time()
    try:
        client.zremrangebyscore(index, "-inf", (now - KEEP_SECONDS) * 1000)
        found: list[bytes] = client.zrangebyscore(index, now * 1000, "+inf")  # type: ignore[assignment]
        ids = [raw.decode() for raw in found]
        if not ids:
            return []
        values = client.mget(
            [key for held_id in ids for key in (held_key(held_id), decision_key(held_id))]
        )
    except (redis.RedisError, OSError) as exc:
        raise Unavailable(f"held calls cannot be read: Redis is unreachable ({exc})") from None
    calls = [
        HeldCall.decode(raw)
        for raw, decided in zip(values[::2], values[1::2], strict=True)
        if raw is not None and decided is None
    ]
    return sorted(calls, key=lambda call: call.held_at)
