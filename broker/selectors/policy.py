"""What a grant has used of its rates and budgets, and the layout of that usage in Redis.

The proxy writes the usage (proxy/policy.py admits and settles calls with Lua scripts that
start with :data:`USAGE_CLOCK`); the agent API reads it here. Both name the keys through
:func:`usage_key`, so the layout is written once:

- ``{usage_key}:rpm``: a sorted set of request times (a sliding window log);
- ``{usage_key}:tpm:{window}``: tokens of the calls that started in that fixed window;
- ``{usage_key}:day:{day}``: tokens of the calls that started on that UTC day;
- ``{usage_key}:usd:day:{day}`` and ``{usage_key}:usd:month:{yyyymm}``: the cost, in whole
  micro-dollars, of the calls that started on that UTC day and in that UTC calendar month.

Each key expires a second after its window, day or month is over: nobody reads it again.
"""

from __future__ import annotations

import logging
import math
from decimal import Decimal
from typing import Any

import redis
from django.conf import settings

from broker.infra.redis import redis_client, redis_key
from broker.services.policy import MICRO_USD, Policy, usd_micros, usd_text

logger = logging.getLogger(__name__)

# Windows and days come from Redis' own clock (TIME), so machines whose clocks disagree
# still agree on them. ARGV[1] is the usage key, ARGV[2] the window in seconds. Lua in
# Redis has no os.date, so the UTC month is worked out from the day number with Howard
# Hinnant's days-to-civil algorithm (http://howardhinnant.github.io/date_algorithms.html):
# ``m`` is the month (``yyyymm``), ``month_end`` the day number of the next month's first.
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
local z = day + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
  - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local month = mp < 10 and mp + 3 or mp - 9
local year = yoe + era * 400 + (month <= 2 and 1 or 0)
local leap = (year % 4 == 0 and year % 100 ~= 0) or year % 400 == 0
local month_days = 31
if month == 2 then month_days = leap and 29 or 28
elseif month == 4 or month == 6 or month == 9 or month == 11 then month_days = 30 end
local month_day = doy - math.floor((153 * mp + 2) / 5) + 1
local month_end = day - month_day + 1 + month_days
local m = string.format('%04d%02d', year, month)
local month_left = month_end * 86400000 - now_ms
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
        tonumber(redis.call('GET', base .. ':day:' .. d) or '0'), frees, window_left, day_left,
        tonumber(redis.call('GET', base .. ':usd:day:' .. d) or '0'),
        tonumber(redis.call('GET', base .. ':usd:month:' .. m) or '0'), month_left}
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
    reading: list[int | None] = [None] * 9
    if policy.counted:
        try:
            raw = redis_client().eval(USAGE_READ, 0, usage_key(policy), window_seconds)
            reading = [int(value) for value in raw]
        except redis.RedisError:
            logger.warning("policy usage unreadable: Redis unreachable")
    requests, window_tokens, day_tokens, frees_ms, window_ms, day_ms = reading[:6]
    day_micros, month_micros, month_ms = reading[6:]

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

    def usd_entry(limit: Decimal | None, micros: int | None, renews_ms: int | None) -> Any:
        # Amounts as decimal strings, as the API gives every amount of dollars.
        counted = entry(None if limit is None else usd_micros(limit), micros, renews_ms)
        if counted is None:
            return None
        for name in ("limit", "used", "remaining"):
            if counted[name] is not None:
                counted[name] = usd_text(counted[name] * MICRO_USD)
        return counted

    return {
        "rpm": entry(policy.rpm, requests, frees_ms),
        "tpm": entry(policy.tpm, window_tokens, window_ms),
        "daily_tokens": entry(policy.daily_tokens, day_tokens, day_ms),
        # Midnight UTC, and the first of next month at midnight UTC.
        "daily_usd": usd_entry(policy.daily_usd, day_micros, day_ms),
        "monthly_usd": usd_entry(policy.monthly_usd, month_micros, month_ms),
        "window_seconds": window_seconds,
    }
