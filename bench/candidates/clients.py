"""The three upstream clients under comparison, behind one small interface.

Each keeps one shared pooled client per process with no connection limit (1,000 open
streams must not queue), no total timeout (streams may be long) and nothing added to the
request that the caller did not send: in particular no default ``accept-encoding``, so
gzip reaches the client only when the client asked for it, and compressed bytes are
forwarded as they came (``aiter_raw`` for httpx, ``auto_decompress=False`` for aiohttp).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import aiohttp
import httpx

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The credential headers go because the upstream one is set from the backend's secret;
# host and content-length because the client library writes its own.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "x-api-key", "authorization"}
RESPONSE_DROP = frozenset(name.encode() for name in HOP_BY_HOP)
STREAM_TIMEOUT = 600.0
# Library defaults that a transparent proxy must not add on the client's behalf.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")


class Answer(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def open(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> Answer: ...


def upstream_headers(headers: Iterable[tuple[str, str]], key: str) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop and credentials, plus the upstream key."""
    out = [(name, value) for name, value in headers if name.lower() not in REQUEST_DROP]
    out.append(("x-api-key", key))
    if not any(name.lower() == "anthropic-version" for name, _ in out):
        out.append(("anthropic-version", "2023-06-01"))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers minus hop-by-hop ones, names lower-cased for ASGI."""
    out = []
    for name, value in headers:
        lower = name.lower()
        if lower not in RESPONSE_DROP:
            out.append((lower, value))
    return out


def _aiohttp_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        auto_decompress=False,
        skip_auto_headers=_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=STREAM_TIMEOUT),
    )


class HttpxAnswer:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.headers = response.headers.raw

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.aiter_raw()

    async def aclose(self) -> None:
        await self.response.aclose()


class HttpxUpstream:
    """``httpx.AsyncClient`` on its own httpcore pool, or on an aiohttp transport."""

    def __init__(self, *, aiohttp_transport: bool = False) -> None:
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=256, keepalive_expiry=60
        )
        transport: httpx.AsyncBaseTransport | None = None
        if aiohttp_transport:
            from httpx_aiohttp import AiohttpTransport

            # The session is created lazily, inside the server's event loop.
            transport = AiohttpTransport(limits=limits, client=_aiohttp_session)
        self.client = httpx.AsyncClient(
            limits=limits,
            timeout=httpx.Timeout(STREAM_TIMEOUT, connect=10.0, pool=None),
            transport=transport,
            trust_env=False,
            follow_redirects=False,
        )
        for name in _AUTO_HEADERS:
            del self.client.headers[name]

    async def open(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> HttpxAnswer:
        request = self.client.build_request(method, url, headers=headers, content=body)
        return HttpxAnswer(await self.client.send(request, stream=True))


class AiohttpAnswer:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.headers = list(response.raw_headers)

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.content.iter_any()

    async def aclose(self) -> None:
        # Returns the connection to the pool when the body was read to its end and closes
        # it otherwise (a client that left mid-stream), which ends the upstream request.
        self.response.release()


class AiohttpUpstream:
    """``aiohttp.ClientSession`` with ``auto_decompress=False``."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def open(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> AiohttpAnswer:
        if self.session is None:
            self.session = _aiohttp_session()
        response = await self.session.request(
            method, url, headers=headers, data=body or None, allow_redirects=False
        )
        return AiohttpAnswer(response)


def from_env() -> tuple[Upstream, str, str]:
    """The client named by ``BENCH_CLIENT``, the upstream base URL and the upstream key."""
    kind = os.environ.get("BENCH_CLIENT", "aiohttp")
    client: Upstream
    if kind == "httpx":
        client = HttpxUpstream()
    elif kind == "httpx-aiohttp":
        client = HttpxUpstream(aiohttp_transport=True)
    elif kind == "aiohttp":
        client = AiohttpUpstream()
    else:
        raise SystemExit(f"BENCH_CLIENT must be httpx, httpx-aiohttp or aiohttp, not {kind!r}")
    base = os.environ["BENCH_UPSTREAM_URL"].rstrip("/")
    return client, base, os.environ.get("BENCH_UPSTREAM_KEY", "sk-ant-api03-bench")
