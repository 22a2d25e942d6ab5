"""The one pooled upstream client of each process (per event loop): aiohttp.

bench/RESULTS.md measured httpx, httpx on an aiohttp transport and aiohttp behind the same
proxy: aiohttp cost a fraction of the CPU per request and kept latency flat under
concurrency, where httpx's pool bookkeeping dominated (encode/httpx#3215).
"""

from __future__ import annotations

import asyncio
import weakref

import aiohttp
from django.conf import settings

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)

KEEPALIVE_SECONDS = 4

# Headers aiohttp would add on its own; the proxy sends only what the client sent.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


def upstream_timeout() -> aiohttp.ClientTimeout:
    """No total limit on a stream: only the gap between two reads is bounded, and it must
    outlast the upstream's ping interval."""
    return aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.PROXY_CONNECT_TIMEOUT_SECONDS,
        sock_read=settings.PROXY_IDLE_TIMEOUT_SECONDS,
    )


def upstream_session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=settings.PROXY_MAX_CONNECTIONS,
                # Shorter than any upstream's own idle timeout (uvicorn's is 5 s): reusing a
                # connection the upstream has just closed would fail a call it never saw.
                keepalive_timeout=KEEPALIVE_SECONDS,
                ttl_dns_cache=60,
            ),
            timeout=upstream_timeout(),
            # Compressed bodies are forwarded as they are, under their own content-encoding.
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            trust_env=False,
            raise_for_status=False,
        )
        _sessions[loop] = session
    return session


async def upstream_close() -> None:
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()
