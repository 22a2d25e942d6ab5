"""An async HTTP/1.1 load generator for the benchmark.

Raw asyncio protocols with httptools' response parser (uvloop when installed): a request
costs the generator a few tens of microseconds, far less than any proxy it measures, and
it sends exactly the headers it is given (no library adds ``accept-encoding``).

It runs N requests at concurrency C over keep-alive connections (one per concurrent slot),
records per-request latency and time to first body byte, validates every answer (status,
JSON with ``usage``, or a complete SSE stream with the expected number of deltas) and
counts errors by kind. It can also hold K streams open at once (``open_streams``).

    python -m bench.load http://127.0.0.1:9100/v1/messages -n 2000 -c 32
    python -m bench.load http://127.0.0.1:9100/v1/messages?chunks=100 --stream -c 32 -n 320
    python -m bench.load http://127.0.0.1:9100/v1/messages?gap_ms=60000 --stream --hold 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

DEFAULT_BODY = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Say hello, briefly."}],
}


@dataclass(frozen=True)
class RequestSpec:
    """One request, encoded once and sent many times, and what a good answer looks like."""

    host: str
    port: int
    target: str  # path and query
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    expect: str = "json"  # json | sse | any
    chunks: int = 0  # deltas an SSE answer must carry (0: any)

    @property
    def raw(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.body or self.method in {"POST", "PUT", "PATCH"}:
            lines.append(f"content-length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def message_request(
    url: str,
    *,
    stream: bool = False,
    chunks: int = 0,
    headers: Iterable[tuple[str, str]] = (),
    method: str = "POST",
    body: bytes | None = None,
) -> RequestSpec:
    """A ``POST /v1/messages``-style request for ``url`` with the SDK's usual headers."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are supported: {url}")
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if body is None and method == "POST":
        body = json.dumps({**DEFAULT_BODY, **({"stream": True} if stream else {})}).encode()
    base = [("anthropic-version", "2023-06-01"), ("accept", "application/json")]
    if body:
        base.append(("content-type", "application/json"))
    return RequestSpec(
        host=parts.hostname,
        port=parts.port or 80,
        target=target,
        method=method,
        headers=(*base, *headers),
        body=body or b"",
        expect="sse" if stream else "json",
        chunks=chunks,
    )


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    latency: float  # seconds from sending to the last byte
    ttfb: float  # seconds from sending to the first body byte
    chunks: list[tuple[float, bytes]]  # (seconds since sending, bytes) per read, when recorded

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.first_body: asyncio.Future[None] | None = None
        self.keep_body = True
        self.record = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.chunks: list[tuple[float, bytes]] = []
        self.t_sent = 0.0
        self.t_first = 0.0
        self.keep_alive = True

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed ones.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("connection closed by server"))

    def _fail(self, exc: BaseException) -> None:
        for future in (self.waiter, self.first_body):
            if future is not None and not future.done():
                future.set_exception(exc)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.t_first:
            self.t_first = time.perf_counter()
            if self.first_body is not None and not self.first_body.done():
                self.first_body.set_result(None)
        if self.keep_body:
            self.body.append(body)
        if self.record:
            self.chunks.append((time.perf_counter() - self.t_sent, body))

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # use
    def _timeout(self) -> None:
        self._fail(TimeoutError("timed out"))
        self.close()

    async def request(self, raw: bytes, timeout: float, *, record: bool = False) -> Response:
        self._reset()
        self.record = record
        self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._timeout)
        assert self.transport is not None
        self.t_sent = time.perf_counter()
        self.transport.write(raw)
        try:
            await self.waiter
        finally:
            timer.cancel()
        end = time.perf_counter()
        if not self.keep_alive:
            self.close()
        return Response(
            self.status,
            self.headers,
            b"".join(self.body),
            end - self.t_sent,
            (self.t_first or end) - self.t_sent,
            self.chunks,
        )

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


async def connect(host: str, port: int, timeout: float = 10.0) -> _Connection:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(_Connection, host, port)
    return protocol


async def fetch(spec: RequestSpec, *, timeout: float = 30.0, record: bool = False) -> Response:
    """One request on a fresh connection (for checks; not for load)."""
    conn = await connect(spec.host, spec.port)
    try:
        return await conn.request(spec.raw, timeout, record=record)
    finally:
        conn.close()


def problem(spec: RequestSpec, response: Response) -> str | None:
    """Why an answer is wrong, or None. Cheap: it runs on every answer under load."""
    if response.status != 200:
        return f"status {response.status}"
    body = response.body
    if spec.expect == "json":
        if not body.startswith(b"{") or b'"usage"' not in body:
            return "JSON answer without usage"
    elif spec.expect == "sse":
        if not body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n'):
            return "stream not complete"
        if spec.chunks and body.count(b"event: content_block_delta") != spec.chunks:
            return "wrong number of deltas"
    return None


@dataclass
class Batch:
    """What one run of N requests at concurrency C measured."""

    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0  # every request sent, warm-ups included (the CPU denominator)
    elapsed: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies)

    def merge(self, other: Batch) -> None:
        self.latencies += other.latencies
        self.ttfbs += other.ttfbs
        self.errors.update(other.errors)
        self.sent += other.sent
        self.elapsed += other.elapsed


async def run_batch(
    spec: RequestSpec,
    *,
    n: int | None,
    concurrency: int,
    duration: float | None = None,
    timeout: float = 60.0,
    warmup: bool = True,
) -> Batch:
    """N requests (or as many as fit in ``duration`` seconds) at the given concurrency.

    Each concurrent slot keeps one connection; with ``warmup`` its first answer is not
    recorded, so that connection set-up is not counted as latency.
    """
    raw = spec.raw
    batch = Batch()
    remaining = [n if n is not None else 1 << 62]
    start = time.perf_counter()
    deadline = start + duration if duration else float("inf")

    async def slot() -> None:
        conn: _Connection | None = None
        try:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                if conn is None or conn.closed:
                    try:
                        conn = await connect(spec.host, spec.port)
                        if warmup:
                            batch.sent += 1
                            await conn.request(raw, timeout)
                    except (OSError, TimeoutError) as exc:
                        batch.errors[_kind(exc)] += 1
                        conn = None
                        await asyncio.sleep(0.01)
                        continue
                remaining[0] -= 1
                batch.sent += 1
                try:
                    response = await conn.request(raw, timeout)
                except (OSError, TimeoutError) as exc:
                    batch.errors[_kind(exc)] += 1
                    conn.close()
                    continue
                wrong = problem(spec, response)
                if wrong:
                    batch.errors[wrong] += 1
                else:
                    batch.latencies.append(response.latency)
                    batch.ttfbs.append(response.ttfb)
        finally:
            if conn is not None:
                conn.close()

    await asyncio.gather(*(slot() for _ in range(concurrency)))
    batch.elapsed = time.perf_counter() - start
    return batch


def _kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__


@dataclass
class Streams:
    """K streams held open: each has its answer's headers and first event."""

    connections: list[_Connection] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def opened(self) -> int:
        return len(self.connections)

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.connections.clear()


async def open_streams(
    spec: RequestSpec, k: int, *, parallel: int = 100, timeout: float = 30.0
) -> Streams:
    """Open K streams and return once each has delivered its first body byte (or failed).

    At most ``parallel`` connections are being set up at a time, so the listen backlogs
    of the servers under test are not what is measured.
    """
    raw = spec.raw
    streams = Streams()
    gate = asyncio.Semaphore(parallel)
    start = time.perf_counter()

    async def one() -> None:
        async with gate:
            try:
                conn = await connect(spec.host, spec.port)
            except (OSError, TimeoutError) as exc:
                streams.errors[_kind(exc)] += 1
                return
            conn.keep_body = False
            conn.first_body = conn.loop.create_future()
            assert conn.transport is not None
            conn.t_sent = time.perf_counter()
            conn.transport.write(raw)
            try:
                async with asyncio.timeout(timeout):
                    await conn.first_body
            except (OSError, TimeoutError) as exc:
                streams.errors[_kind(exc)] += 1
                conn.close()
                return
            if conn.status != 200:
                streams.errors[f"status {conn.status}"] += 1
                conn.close()
                return
            streams.connections.append(conn)

    await asyncio.gather(*(one() for _ in range(k)))
    streams.elapsed = time.perf_counter() - start
    return streams


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _summary(batch: Batch) -> str:
    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.2f}"

    return (
        f"completed {batch.completed} in {batch.elapsed:.2f}s "
        f"({batch.completed / batch.elapsed:.0f} req/s), errors {dict(batch.errors) or 0}\n"
        f"latency ms  p50 {ms(batch.latencies, 50)}  p90 {ms(batch.latencies, 90)}  "
        f"p99 {ms(batch.latencies, 99)}  max {ms(batch.latencies, 100)}\n"
        f"ttfb ms     p50 {ms(batch.ttfbs, 50)}  p90 {ms(batch.ttfbs, 90)}  "
        f"p99 {ms(batch.ttfbs, 99)}"
    )


async def _cli(args: argparse.Namespace) -> None:
    headers = [tuple(h.split(":", 1)) for h in args.header]
    spec = message_request(
        args.url,
        stream=args.stream,
        chunks=args.chunks,
        headers=[(k.strip(), v.strip()) for k, v in headers],
        method=args.method,
        body=args.data.encode() if args.data is not None else None,
    )
    if args.method != "POST" or args.data is not None:
        spec = dataclasses.replace(spec, expect="any")
    if args.hold:
        streams = await open_streams(spec, args.hold, timeout=args.timeout)
        print(
            f"{streams.opened} streams open after {streams.elapsed:.2f}s, "
            f"errors {dict(streams.errors) or 0}; holding {args.hold_seconds:.0f}s"
        )
        await asyncio.sleep(args.hold_seconds)
        streams.close()
        return
    batch = await run_batch(
        spec, n=args.n, concurrency=args.c, duration=args.duration, timeout=args.timeout
    )
    print(_summary(batch))


def main(argv: list[str] | None = None) -> None:
    from bench.upstream import run_loop

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("-n", type=int, default=1000, help="requests (default 1000)")
    parser.add_argument("-c", type=int, default=1, help="concurrency (default 1)")
    parser.add_argument("--duration", type=float, help="stop issuing after this many seconds")
    parser.add_argument("--method", default="POST")
    parser.add_argument("-H", "--header", action="append", default=[], help="'name: value'")
    parser.add_argument("--data", help="request body (default: a small Messages request)")
    parser.add_argument("--stream", action="store_true", help='send "stream": true')
    parser.add_argument("--chunks", type=int, default=0, help="deltas each stream must carry")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--hold", type=int, default=0, help="hold K streams open instead")
    parser.add_argument("--hold-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(_cli(args))


if __name__ == "__main__":
    main()
