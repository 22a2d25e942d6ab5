"""The one pooled upstream client of each process (per event loop)."""

from __future__ import annotations

import asyncio
import weakref

import httpx
from django.conf import settings

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def upstream_client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = httpx.AsyncClient(
            # Streams have no total time limit: only the gap between two reads is bounded,
            # and it must outlast the upstream's ping interval.
            timeout=httpx.Timeout(
                connect=settings.PROXY_CONNECT_TIMEOUT_SECONDS,
                read=settings.PROXY_IDLE_TIMEOUT_SECONDS,
                write=settings.PROXY_IDLE_TIMEOUT_SECONDS,
                pool=settings.PROXY_CONNECT_TIMEOUT_SECONDS,
            ),
            limits=httpx.Limits(
                max_connections=settings.PROXY_MAX_CONNECTIONS,
                max_keepalive_connections=settings.PROXY_MAX_CONNECTIONS,
                keepalive_expiry=30,
            ),
            follow_redirects=False,
            # The proxy forwards the client's own Accept-Encoding and never decodes bodies.
            headers={"accept-encoding": "identity"},
            trust_env=False,
        )
        _clients[loop] = client
    return client


async def upstream_close() -> None:
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()
