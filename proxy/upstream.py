"""The one pooled upstream client of each process (per event loop): aiohttp.

bench/RESULTS.md measured httpx, httpx on an aiohttp transport and aiohttp behind the same
proxy: aiohttp cost a fraction of the CPU per request and kept latency flat under
concurrency, where httpx's pool bookkeeping dominated (encode/httpx#3215).
"""

from __future__ import annotations

import aiohttp
from django.conf import settings

from broker.infra.loops import LoopLocal

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


def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
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


_sessions = LoopLocal(_new_session)


def upstream_session() -> aiohttp.ClientSession:
    session = _sessions.get()
    return _sessions.replace(_new_session()) if session.closed else session


async def upstream_close() -> None:
    session = _sessions.pop()
    if session is not None:
        await session.close()
