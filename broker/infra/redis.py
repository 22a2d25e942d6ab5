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


_async_clients: LoopLocal[dict[tuple[str, int], redis.asyncio.Redis]] = LoopLocal(dict)


def async_redis_client() -> redis.asyncio.Redis:
    """This event loop's client, on a pool of a size chosen on purpose.

    redis-py's default pool fails a call at once when its 100 connections are in use, so a
    burst of one agent failed everyone's calls; this pool makes a call wait briefly for a
    connection instead (PROXY_REDIS_WAIT_SECONDS), and raises a ConnectionError only then.
    """
    clients = _async_clients.get()
    url, size = settings.REDIS_URL, settings.PROXY_REDIS_CONNECTIONS
    client = clients.get((url, size))
    if client is None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=size,
            timeout=settings.PROXY_REDIS_WAIT_SECONDS,
            socket_connect_timeout=1,
            socket_timeout=1,
        )
        client = clients[(url, size)] = redis.asyncio.Redis(connection_pool=pool)
    return client


def redis_key(*parts: str) -> str:
    return ":".join((settings.REDIS_KEY_PREFIX, *parts))
