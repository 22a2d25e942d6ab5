"""One Redis client per URL and process (per event loop for asyncio), shared by everything
that talks to Redis directly."""

from __future__ import annotations

import functools

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


def redis_key(*parts: str) -> str:
    return ":".join((settings.REDIS_KEY_PREFIX, *parts))
