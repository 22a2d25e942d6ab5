"""One Redis client per URL and process (per event loop for asyncio), shared by everything
that talks to Redis directly."""

from __future__ import annotations

import functools
import time

import redis
import redis.asyncio
from django.conf import settings

from broker.infra.loops import LoopLocal


@functools.cache
def _client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=2, health_check_interval=30
    )


def redis_client() -> redis.Redis:
    return _client_for(settings.REDIS_URL)


_async_clients: LoopLocal[dict[tuple[str, int, float], redis.asyncio.Redis]] = LoopLocal(dict)

# Counting after a call (usage settlements, batch holds) waits this long for a connection:
# nobody waits for it, and giving up loses the count.
COUNTING_CONNECTIONS = 8
COUNTING_WAIT_SECONDS = 30.0


def _pooled_client(size: int, wait: float) -> redis.asyncio.Redis:
    clients = _async_clients.get()
    url = settings.REDIS_URL
    client = clients.get((url, size, wait))
    if client is None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=size, timeout=wait, socket_connect_timeout=1, socket_timeout=1
        )
        client = clients[(url, size, wait)] = redis.asyncio.Redis(connection_pool=pool)
    return client


def async_redis_client() -> redis.asyncio.Redis:
    """This event loop's client for the request path, on a pool of a size chosen on purpose.

    redis-py's default pool fails a call at once when its 100 connections are in use, so a
    burst of one agent failed everyone's calls; this pool makes a call wait briefly for a
    connection instead (PROXY_REDIS_WAIT_SECONDS), and raises a ConnectionError only then.
    """
    return _pooled_client(settings.PROXY_REDIS_CONNECTIONS, settings.PROXY_REDIS_WAIT_SECONDS)


def async_counting_client() -> redis.asyncio.Redis:
    """This event loop's client for counting a call after it ended, on a pool of its own.

    Sharing the request path's pool, a burst's admissions queued ahead of the counting of
    calls already made: that counting gave up after the request path's short wait and was
    lost, and it took connections the admissions were waiting for.
    """
    return _pooled_client(COUNTING_CONNECTIONS, COUNTING_WAIT_SECONDS)


# How long the request path skips Redis after it stopped answering, unless the access
# listener, which keeps trying in the background, hears from it sooner (or fails again).
# Longer than one of the listener's attempts on a frozen Redis (0.5 s + two 1 s timeouts).
BREAKER_SECONDS = 3.0


class RedisSkipped(redis.ConnectionError):
    """Redis was not asked: it stopped answering moments ago (RedisBreaker)."""


class RedisBreaker:
    """Per event loop: whether the proxy's request path should skip Redis for now.

    A frozen Redis answers nothing and refuses nothing, so without this every call waited
    out the socket timeout before falling back (docs/reliability.md). Open, calls go
    straight to their fallback: the database for access, a 503 (or fail-open) for limits.
    Opened by a timeout on the request path or a failure of the access listener; closed by
    the listener once Redis answers it again.
    """

    def __init__(self) -> None:
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def check(self) -> None:
        """Raise RedisSkipped while open: where the call would have failed on Redis, and
        its caller's fallback is the same."""
        if self.open:
            raise RedisSkipped("skipped: Redis stopped answering")

    def trip(self) -> None:
        self._open_until = time.monotonic() + BREAKER_SECONDS

    def trip_on(self, exc: BaseException) -> None:
        """Open when ``exc`` says Redis did not answer in time; a refused connection fails
        fast by itself, and a pool with no free connection is this process being busy."""
        if isinstance(exc, redis.TimeoutError):
            self.trip()

    def close(self) -> None:
        self._open_until = 0.0


_breakers: LoopLocal[RedisBreaker] = LoopLocal(RedisBreaker)


def redis_breaker() -> RedisBreaker:
    return _breakers.get()


def redis_key(*parts: str) -> str:
    return ":".join((settings.REDIS_KEY_PREFIX, *parts))
