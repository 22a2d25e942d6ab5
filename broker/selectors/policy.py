"""What a grant has used of its rates and budgets, and the layout of that usage in Redis.

The proxy writes the usage (proxy/policy.py admits and settles calls with Lua scripts that
start with :data:`USAGE_CLOCK`); the agent API reads it here. Both name the keys through
:func:`usage_key`, so the layout is written once:

- ``{usage_key}:rpm``: a sorted set of request times (a sliding window log);
- ``{usage_key}:tpm:{window}``: tokens of the calls that started in that fixed window;
- ``{usage_key}:day:{day}``: tokens of the calls that started on that UTC day.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from django.conf import settings

from broker.infra.redis import redis_client, redis_key
from broker.services.policy import Policy

logger = logging.getLogger(__name__)

# Windows and days come from Redis' own clock (TIME), so machines whose clocks disagree
# still agree on them. ARGV[1] is the usage key, ARGV[2] the window in seconds.
USAGE_CLOCK = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window_ms = tonumber(ARGV[2]) * 1000
local window = math.floor(now_ms / window_ms)
local day = math.floor(tonumber(now[1]) / 86400)
local w = string.format('%d', window)
local d = string.format('%d', day)
local window_left = (window + 1) * window_ms - now_ms
local day_left = (day + 1) * 86400000 - now_ms
local base = ARGV[1]
"""

USAGE_READ = (
    USAGE_CLOCK
    + """
local key = base .. ':rpm'
local since = '(' .. string.format('%d', now_ms - window_ms)
local requests = redis.call('ZCOUNT', key, since, '+inf')
local oldest = redis.call('ZRANGEBYSCORE', key, since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local frees = 0
if oldest[2] then frees = tonumber(oldest[2]) + window_ms - now_ms end
return {requests, tonumber(redis.call('GET', base .. ':tpm:' .. w) or '0'),
        tonumber(redis.call('GET', base .. ':day:' .. d) or '0'), frees, window_left, day_left}
"""
)


def usage_key(policy: Policy) -> str:
    return redis_key("policy", str(policy.grant_id))


def seconds_until(milliseconds: int) -> int:
    """Whole seconds, rounded up and at least one: what ``retry-after`` and ``resets_in`` say."""
    return max(1, math.ceil(milliseconds / 1000))


def policy_left(policy: Policy) -> dict[str, Any]:
    """Each rate and budget of the grant: its limit, what is used and left, when it renews.

    ``used`` and ``remaining`` are None when Redis cannot be read; a limit that is not set
    is None altogether.
    """
    window_seconds = settings.POLICY_WINDOW_SECONDS
    reading: list[int | None] = [None] * 6
    if policy.counted:
        try:
            raw = redis_client().eval(USAGE_READ, 0, usage_key(policy), window_seconds)
            reading = [int(value) for value in raw]
        except redis.RedisError:
            logger.warning("policy usage unreadable: Redis unreachable")
    requests, window_tokens, day_tokens, frees_ms, window_ms, day_ms = reading

    def entry(limit: int | None, used: int | None, renews_ms: int | None) -> dict[str, Any] | None:
        if limit is None:
            return None
        return {
            "limit": limit,
            "used": used,
            "remaining": max(0, limit - used) if used is not None else None,
            # Seconds until some of it comes back: the oldest request leaving the sliding
            # window, the fixed window ending, midnight UTC.
            "resets_in": None if used is None or renews_ms is None else seconds_until(renews_ms),
        }

    return {
        "rpm": entry(policy.rpm, requests, frees_ms),
        "tpm": entry(policy.tpm, window_tokens, window_ms),
        "daily_tokens": entry(policy.daily_tokens, day_tokens, day_ms),
        "window_seconds": window_seconds,
    }
