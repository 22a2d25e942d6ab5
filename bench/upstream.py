"""The benchmark's fake Anthropic upstream, in its own process, in two builds.

``--server raw`` (the default): raw asyncio with httptools (uvloop when installed), so
that it costs a few tens of microseconds per request and never is the bottleneck.
``--server aiohttp``: the same answers from an ``aiohttp.web`` application, the issue 13
reporter's upstream, which costs about what a small real service costs per request; the
throughput target ("40 % of nginx's against the same upstream") was set against it.
Both speak HTTP/1.1 with keep-alive:

- ``POST /v1/messages``: a JSON message with a ``usage`` block, or, when the body has
  ``"stream": true``, Server-Sent Events in Anthropic's wire format (``message_start``,
  ``content_block_start``, ``ping``, N ``content_block_delta``, ``content_block_stop``,
  ``message_delta`` with cumulative usage, ``message_stop``), one event per HTTP chunk.
- ``GET /v1/models``: a short model list, so key validation has something to call.
- ``GET /_bench/stats``: counters the harness reads (requests, streams open, completed and
  aborted, which kind of credential arrived).

Any ``x-api-key`` or ``Authorization`` is accepted. The shape of an answer comes from the
command line (``--chunks``, ``--ttft-ms``, ``--gap-ms``) and can be overridden per request
with query parameters, because every proxy forwards query strings verbatim:
``chunks``, ``ttft_ms``, ``gap_ms``, ``status`` (answer with that error status instead),
``gzip=1`` (gzip the JSON body when the request accepts gzip).

    python -m bench.upstream --port 9100 --chunks 100 --ttft-ms 200 --gap-ms 20
    python -m bench.upstream --server aiohttp --port 9101
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httptools

MODEL = "claude-sonnet-4-5-20250929"
MESSAGE_ID = "msg_01BenchFakeUpstream00000"
TEXT = "Hello from the fake upstream. "
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


@dataclass(frozen=True)
class Shape:
    """How an answer is paced: number of deltas, time to first token, gap between deltas."""

    chunks: int = 20
    ttft: float = 0.0
    gap: float = 0.0

    def overridden(self, params: dict[str, str]) -> Shape:
        """This shape with the request's query parameters (chunks, ttft_ms, gap_ms) applied."""
        return Shape(
            chunks=int(params.get("chunks", self.chunks)),
            ttft=float(params.get("ttft_ms", self.ttft * 1000)) / 1000,
            gap=float(params.get("gap_ms", self.gap * 1000)) / 1000,
        )


def json_body() -> bytes:
    """The JSON answer to every non-streamed ``POST /v1/messages`` (byte-for-byte fixed)."""
    return json.dumps(
        {
            "id": MESSAGE_ID,
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [{"type": "text", "text": TEXT * 8}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 64,
            },
        },
        separators=(",", ":"),
    ).encode()


def _event(name: str, data: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


SSE_START = _event(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": MESSAGE_ID,
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        },
    },
)
SSE_BLOCK_START = _event(
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
) + _event("ping", {"type": "ping"})
SSE_DELTA = _event(
    "content_block_delta",
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TEXT}},
)


def sse_end(chunks: int) -> bytes:
    """The events after the last delta; ``message_delta`` carries the cumulative usage."""
    return (
        _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": chunks},
            },
        )
        + _event("message_stop", {"type": "message_stop"})
    )


JSON_BODY = json_body()
JSON_BODY_GZIP = gzip.compress(JSON_BODY, mtime=0)
MODELS_BODY = json.dumps(
    {
        "data": [
            {
                "type": "model",
                "id": MODEL,
                "display_name": "Claude Sonnet 4.5",
                "created_at": "2025-09-29T00:00:00Z",
            }
        ],
        "has_more": False,
        "first_id": MODEL,
        "last_id": MODEL,
    }
).encode()
_CHUNKED_DELTA = _chunk(SSE_DELTA)
_CHUNKED_START = _chunk(SSE_START) + _chunk(SSE_BLOCK_START)
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests"}


def error_body(status: int) -> bytes:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")
    return json.dumps(
        {"type": "error", "error": {"type": kind, "message": f"fake upstream error {status}"}}
    ).encode()


def error_reply(status: int) -> tuple[bytes, dict[str, str]]:
    """An error answer's body and its extra headers (a 429 says when to come back)."""
    extra = {"retry-after": "7", "x-should-retry": "true"} if status == 429 else {}
    return error_body(status), extra


class Stats:
    __slots__ = ("aborted", "active", "completed", "credentials", "messages", "requests", "streams")

    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.active = 0
        self.completed = 0
        self.aborted = 0
        self.credentials: Counter[str] = Counter()
        # POST /v1/messages by the key's last 16 characters: each proxy's calls, to count
        # against the audit events it wrote.
        self.messages: Counter[str] = Counter()

    def count(self, path: bytes, method: bytes, headers: dict[bytes, bytes]) -> None:
        """One request: its credential's kind, and for a message its key's tail."""
        self.credentials[_credential_kind(headers)] += 1
        if path == b"/v1/messages" and method == b"POST":
            key = headers.get(b"x-api-key") or headers.get(b"authorization", b"")
            self.messages[key[-16:].decode("latin-1")] += 1

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "streams_started": self.streams,
                "streams_active": self.active,
                "streams_completed": self.completed,
                "streams_aborted": self.aborted,
                "credentials": dict(self.credentials),
                "messages_by_key": dict(self.messages),
            }
        ).encode()


def _credential_kind(headers: dict[bytes, bytes]) -> str:
    bearer = headers.get(b"authorization", b"").removeprefix(b"Bearer ")
    value = headers.get(b"x-api-key") or bearer
    if not value:
        return "none"
    if value.startswith(b"crd_"):
        return "crd_ token (leaked!)"
    if value.startswith(b"sk-ant-"):
        return "sk-ant key"
    return "other"


class UpstreamProtocol(asyncio.Protocol):
    """One client connection; requests on it are answered one after the other."""

    def __init__(self, shape: Shape, stats: Stats) -> None:
        self.shape = shape
        self.stats = stats
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.queue: list[tuple[bytes, bytes, dict[bytes, bytes], bytes, bool]] = []
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed ones.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, b"application/json", error_body(400), keep_alive=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            # The client (a proxy) hung up mid-answer: that is what "disconnect
            # propagates" means, so it is counted and the answer stops at once.
            self.task.cancel()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = (
            self.parser.get_method(),
            self.url,
            self.headers,
            b"".join(self.body),
            self.parser.should_keep_alive(),
        )
        if self.task is None or self.task.done():
            self._handle(*request)
        else:
            self.queue.append(request)

    # answering
    def _write(
        self,
        status: int,
        content_type: bytes,
        body: bytes,
        *,
        keep_alive: bool,
        extra: bytes = b"",
    ) -> None:
        if self.transport is None or self.closed:
            return
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"request-id: req_bench%012d\r\n%s%s\r\n%s"
            % (
                status,
                _REASONS.get(status, b"Error"),
                content_type,
                len(body),
                self.stats.requests,
                extra,
                b"" if keep_alive else b"connection: close\r\n",
                body,
            )
        )
        if not keep_alive:
            self.transport.close()

    def _handle(
        self, method: bytes, url: bytes, headers: dict[bytes, bytes], body: bytes, keep: bool
    ) -> None:
        self.stats.requests += 1
        path, _, query = url.partition(b"?")
        if path == b"/_bench/stats":
            self._write(200, b"application/json", self.stats.as_json(), keep_alive=keep)
            return
        self.stats.count(path, method, headers)
        params = dict(parse_qsl(query.decode("latin-1"))) if query else {}
        if path == b"/v1/models" and method == b"GET":
            self._write(200, b"application/json", MODELS_BODY, keep_alive=keep)
            return
        if path != b"/v1/messages" or method != b"POST":
            self._write(404, b"application/json", error_body(404), keep_alive=keep)
            return
        if "status" in params:
            status = int(params["status"])
            body, headers_extra = error_reply(status)
            extra = b"".join(
                b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers_extra.items()
            )
            self._write(status, b"application/json", body, keep_alive=keep, extra=extra)
            return
        shape = self.shape.overridden(params)
        if _STREAM_TRUE.search(body):
            self.stats.streams += 1
            self.task = asyncio.ensure_future(self._stream(shape, keep))
            return
        gzipped = params.get("gzip") == "1" and b"gzip" in headers.get(b"accept-encoding", b"")
        answer = (
            (JSON_BODY_GZIP, b"content-encoding: gzip\r\nvary: accept-encoding\r\n")
            if gzipped
            else (JSON_BODY, b"")
        )
        if shape.ttft:
            self.task = asyncio.ensure_future(self._delayed(shape.ttft, *answer, keep))
        else:
            self._write(200, b"application/json", answer[0], keep_alive=keep, extra=answer[1])

    def _next(self) -> None:
        self.task = None
        while self.queue and (self.task is None or self.task.done()):
            self._handle(*self.queue.pop(0))

    async def _delayed(self, delay: float, body: bytes, extra: bytes, keep: bool) -> None:
        await asyncio.sleep(delay)
        self._write(200, b"application/json", body, keep_alive=keep, extra=extra)
        self._next()

    async def _stream(self, shape: Shape, keep: bool) -> None:
        transport = self.transport
        assert transport is not None
        self.stats.active += 1
        try:
            transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
                b"request-id: req_bench%012d\r\n%s\r\n%s"
                % (
                    self.stats.requests,
                    b"" if keep else b"connection: close\r\n",
                    _CHUNKED_START,
                )
            )
            if shape.ttft:
                await asyncio.sleep(shape.ttft)
            for i in range(shape.chunks):
                if i and shape.gap:
                    await asyncio.sleep(shape.gap)
                if self.closed:
                    raise asyncio.CancelledError
                transport.write(_CHUNKED_DELTA)
            transport.write(_chunk(sse_end(shape.chunks)) + b"0\r\n\r\n")
            self.stats.completed += 1
        except asyncio.CancelledError:
            self.stats.aborted += 1
            return
        finally:
            self.stats.active -= 1
        if not keep:
            transport.close()
            return
        self._next()


async def serve(host: str, port: int, shape: Shape) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(
        lambda: UpstreamProtocol(shape, stats), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    # The harness reads this line to learn the port when it passed --port 0.
    print(f"listening on http://{host}:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def aiohttp_app(shape: Shape, stats: Stats) -> Any:
    """The same answers as UpstreamProtocol's, from an ``aiohttp.web`` application."""
    from aiohttp import web

    async def messages(request: web.Request) -> web.StreamResponse:
        _count(request, stats)
        params = dict(request.query)
        if "status" in params:
            status = int(params["status"])
            body, extra = error_reply(status)
            return web.Response(status=status, body=body, headers=_reply_headers(stats, extra))
        shape_now = shape.overridden(params)
        body = await request.read()
        if not _STREAM_TRUE.search(body):
            gzipped = params.get("gzip") == "1" and "gzip" in request.headers.get(
                "accept-encoding", ""
            )
            if shape_now.ttft:
                await asyncio.sleep(shape_now.ttft)
            extra = {"content-encoding": "gzip", "vary": "accept-encoding"} if gzipped else {}
            return web.Response(
                body=JSON_BODY_GZIP if gzipped else JSON_BODY,
                headers=_reply_headers(stats, extra),
            )
        stats.streams += 1
        stats.active += 1
        answer = web.StreamResponse(
            headers={
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
                "request-id": f"req_bench{stats.requests:012d}",
            }
        )
        try:
            await answer.prepare(request)
            await answer.write(SSE_START + SSE_BLOCK_START)
            if shape_now.ttft:
                await asyncio.sleep(shape_now.ttft)
            for i in range(shape_now.chunks):
                if i and shape_now.gap:
                    await asyncio.sleep(shape_now.gap)
                await answer.write(SSE_DELTA)
            await answer.write(sse_end(shape_now.chunks))
            await answer.write_eof()
            stats.completed += 1
        except (asyncio.CancelledError, ConnectionError):
            stats.aborted += 1
            raise
        finally:
            stats.active -= 1
        return answer

    async def models(request: web.Request) -> web.Response:
        _count(request, stats)
        return web.Response(body=MODELS_BODY, headers=_reply_headers(stats, {}))

    async def bench_stats(request: web.Request) -> web.Response:
        stats.requests += 1
        return web.Response(body=stats.as_json(), content_type="application/json")

    # A client that leaves mid-answer cancels its handler: that is "disconnect propagates".
    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_bench/stats", bench_stats)
    return app


def _count(request: Any, stats: Stats) -> None:
    """One request to the aiohttp build, counted as UpstreamProtocol counts its own."""
    stats.requests += 1
    headers = {k.lower().encode(): v.encode("latin-1") for k, v in request.headers.items()}
    stats.count(request.path.encode(), request.method.encode(), headers)


def _reply_headers(stats: Stats, extra: dict[str, str]) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "request-id": f"req_bench{stats.requests:012d}",
        **extra,
    }


async def serve_aiohttp(host: str, port: int, shape: Shape) -> None:
    from aiohttp import web

    runner = web.AppRunner(aiohttp_app(shape, Stats()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server", choices=("raw", "aiohttp"), default="raw",
        help="raw asyncio + httptools (never the bottleneck), or aiohttp.web (issue 13's)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("BENCH_UPSTREAM_PORT", 0)))
    parser.add_argument(
        "--chunks", type=int, default=int(os.environ.get("BENCH_CHUNKS", 20)), help="deltas"
    )
    parser.add_argument(
        "--ttft-ms", type=float, default=float(os.environ.get("BENCH_TTFT_MS", 0)),
        help="time before the first delta",
    )  # fmt: skip
    parser.add_argument(
        "--gap-ms", type=float, default=float(os.environ.get("BENCH_GAP_MS", 0)),
        help="time between deltas",
    )  # fmt: skip
    args = parser.parse_args(argv)
    shape = Shape(args.chunks, args.ttft_ms / 1000, args.gap_ms / 1000)
    with contextlib.suppress(KeyboardInterrupt):
        server = serve_aiohttp if args.server == "aiohttp" else serve
        run_loop(server(args.host, args.port, shape))
    sys.exit(0)


if __name__ == "__main__":
    main()
