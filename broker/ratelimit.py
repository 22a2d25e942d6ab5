"""Fixed-window counters in Redis, shared by every process and machine.

One atomic script per hit: the counter and its expiry are set together, so a crash between
the two can never leave a window that does not end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from django.conf import settings

from broker.errors import ServiceError
from broker.redis import redis_client, redis_key

logger = logging.getLogger(__name__)

# KEYS[1] counter; ARGV[1] window seconds. Returns {count, milliseconds left in window}.
_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1] * 1000) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1] * 1000); ttl = ARGV[1] * 1000 end
return {count, ttl}
"""


class RateLimited(ServiceError):
    status_code = 429
    error_type = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LimiterUnavailable(ServiceError):
    status_code = 503
    error_type = "unavailable"


@dataclass(frozen=True)
class Rate:
    limit: int
    window_seconds: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"20/10m"``, ``"5/s"``, ``"100/h"``: a count per window."""
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            count, per = text.split("/")
            number = per[:-1] or "1"
            rate = cls(int(count), int(number) * units[per[-1]])
        except (ValueError, KeyError, IndexError):
            raise ValueError(f"not a rate like 20/10m: {text!r}") from None
        if rate.limit < 1 or rate.window_seconds < 1:
            raise ValueError(f"a rate needs a positive count and window: {text!r}")
        return rate


def rate_limit_hit(*, scope: str, key: str, rate: Rate, what: str) -> None:
    """Count one hit; RateLimited once ``rate`` is used up in the current window."""
    try:
        count, ttl_ms = redis_client().eval(
            _HIT, 1, redis_key("ratelimit", scope, key), rate.window_seconds
        )
    except redis.RedisError:
        logger.error("rate limiter unavailable (Redis) for %s", scope)
        raise LimiterUnavailable(
            f"{what} is unavailable: the rate limiter cannot reach Redis"
        ) from None
    if int(count) > rate.limit:
        retry_after = max(1, -(-int(ttl_ms) // 1000))
        raise RateLimited(
            f"too many {what} requests from this address; retry in {retry_after}s",
            retry_after=retry_after,
        )


def enrollment_rate() -> Rate:
    return Rate.parse(settings.ENROLL_RATE)
