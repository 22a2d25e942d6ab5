"""An upstream that misbehaves on request, over raw sockets: what a real HTTP server
framework would not let it send (a reset, a length that lies, a stream cut mid-chunk).

Each request names its fault in an ``x-chaos`` header, which the proxy forwards as it
forwards any header; without one it answers like Anthropic. It counts the connections it
has open and notes every request that the other side abandoned before its answer ended.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import struct
import threading
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache

from tests.fake_anthropic import error, message_body, sse_frames
from tests.waiting import wait_until

# A gzip bomb: this many bytes of blank SSE lines, compressed to well under 1 MB.
BOMB_DECOMPRESSED = 256 * 1024 * 1024
# The SSE line an upstream should never send: one data line this long.
HUGE_LINE = 50 * 1024 * 1024
# How long a silent upstream stays silent; the proxy under test is run with an idle
# timeout well below it.
SILENCE_SECONDS = 3.0
CHUNK = 256 * 1024


@dataclass
class Seen:
    path: str
    chaos: str
    body: bytes


@dataclass
class ChaosUpstream:
    url: str = ""
    open_connections: int = 0
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    # Requests whose answer (or whose body) the other side stopped reading midway.
    abandoned: list[str] = field(default_factory=list)
    # The fake's own failures: a fault it did not mean to inject. Tests check it is empty.
    failures: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.connections += 1
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.open_connections -= 1
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        chaos = headers.get("x-chaos", "")
        length = int(headers.get("content-length", "0") or 0)
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            self.abandoned.append(f"{chaos or 'request'} body")
            return False
        self.requests.append(Seen(path, chaos, body))
        answer = ANSWERS.get(chaos, _ok)
        try:
            return await answer(self, reader, writer, body)
        except ConnectionError:
            self.abandoned.append(chaos)
            return False
        except Exception as exc:
            self.failures.append(f"{chaos or 'ok'}: {type(exc).__name__}: {exc}")
            raise

    def stop(self) -> None:
        assert self.loop is not None
        assert self.thread is not None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


Answer = Callable[
    [ChaosUpstream, asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]
]


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    reason = {200: "OK", 529: "Overloaded"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", f"request-id: req_{uuid.uuid4().hex[:24]}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


SSE_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("transfer-encoding", "chunked"),
]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN, as a crashed upstream or a middlebox does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _json(writer: asyncio.StreamWriter, status: int, payload: object) -> bool:
    body = json.dumps(payload).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    writer.write(_head(status, headers) + body)
    await writer.drain()
    return True


async def _ok(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
) -> bool:
    request = json.loads(body or b"{}")
    if request.get("stream"):
        writer.write(_head(200, SSE_HEADERS))
        for frame in sse_frames(request, 3):
            writer.write(_chunk(frame))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
    return await _json(writer, 200, message_body(request))


async def _reset_before_headers(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    _reset(writer)
    return False


async def _reset_after_headers(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    writer.write(_head(200, SSE_HEADERS) + _chunk(sse_frames({}, 1)[0]))
    await writer.drain()
    _reset(writer)
    return False


async def _cut_mid_event(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    frames = sse_frames({}, 3)
    writer.write(_head(200, SSE_HEADERS) + _chunk(frames[0]) + _chunk(frames[3][:20]))
    await writer.drain()
    writer.close()  # a FIN in the middle of an event, and no last chunk
    return False


async def _overloaded(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    return await _json(writer, 529, error("overloaded_error", "Overloaded"))


async def _gzip_short(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
) -> bool:
    """A gzip body whose Content-Length promises more than is sent."""
    packed = gzip.compress(json.dumps(message_body(json.loads(body or b"{}"))).encode())
    headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
        ("content-length", str(len(packed) + 4096)),
    ]
    writer.write(_head(200, headers) + packed)
    await writer.drain()
    writer.close()
    return False


SMUGGLED = b"smuggled by the upstream"


async def _gzip_long(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
) -> bool:
    """A gzip body whose Content-Length promises less than is sent: what follows it looks
    like the answer to the connection's next request."""
    packed = gzip.compress(json.dumps(message_body(json.loads(body or b"{}"))).encode())
    headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
        ("content-length", str(len(packed))),
    ]
    extra = [("content-type", "application/json"), ("content-length", str(len(SMUGGLED)))]
    writer.write(_head(200, headers) + packed + _head(200, extra) + SMUGGLED)
    await writer.drain()
    return True


@cache
def gzip_bomb() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\n" * (1024 * 1024)
    parts = [packer.compress(block) for _ in range(BOMB_DECOMPRESSED // len(block))]
    return b"".join([*parts, packer.flush()])


async def _bomb(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    bomb = gzip_bomb()
    headers = [
        ("content-type", "text/event-stream"),
        ("content-encoding", "gzip"),
        ("content-length", str(len(bomb))),
    ]
    writer.write(_head(200, headers))
    for start in range(0, len(bomb), CHUNK):
        writer.write(bomb[start : start + CHUNK])
        await writer.drain()
    return True


async def _huge_line(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    frames = sse_frames({}, 1)
    writer.write(
        _head(200, SSE_HEADERS) + _chunk(frames[0]) + _chunk(b"event: message_delta\ndata: ")
    )
    piece = b"x" * CHUNK
    for _ in range(HUGE_LINE // CHUNK):
        writer.write(_chunk(piece))
        await writer.drain()
    writer.write(_chunk(b"\n\n" + frames[-1]) + b"0\r\n\r\n")
    await writer.drain()
    return True


async def _silent_before_headers(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    await asyncio.sleep(SILENCE_SECONDS)
    return False


async def _silent_mid_stream(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    writer.write(_head(200, SSE_HEADERS) + _chunk(sse_frames({}, 1)[0]))
    await writer.drain()
    await asyncio.sleep(SILENCE_SECONDS)
    return False


async def _slow_headers(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
) -> bool:
    """A long non-streamed message: nothing for a while (watching for a hang-up), then the
    answer."""
    try:
        gone = await asyncio.wait_for(reader.read(1), timeout=SILENCE_SECONDS)
    except TimeoutError:
        gone = None
    if gone is not None:  # b"" at EOF: the proxy closed the connection
        raise ConnectionResetError("the proxy closed the connection before the answer")
    return await _ok(chaos, reader, writer, body)


async def _slow_stream(
    chaos: ChaosUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: bytes
) -> bool:
    """A long stream, a frame every 0.1 s, for a client that hangs up in the middle."""
    writer.write(_head(200, SSE_HEADERS))
    for frame in sse_frames({}, 300):
        writer.write(_chunk(frame))
        await writer.drain()
        await asyncio.sleep(0.1)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


ANSWERS: dict[str, Answer] = {
    "reset-before-headers": _reset_before_headers,
    "reset-after-headers": _reset_after_headers,
    "cut-mid-event": _cut_mid_event,
    "overloaded": _overloaded,
    "gzip-short": _gzip_short,
    "gzip-long": _gzip_long,
    "bomb": _bomb,
    "huge-line": _huge_line,
    "silent-before-headers": _silent_before_headers,
    "silent-mid-stream": _silent_mid_stream,
    "slow-stream": _slow_stream,
    "slow-headers": _slow_headers,
}


def chaos_in_thread(port: int) -> ChaosUpstream:
    """Start a ChaosUpstream on 127.0.0.1:``port`` in a thread of its own; stop() ends it."""
    chaos = ChaosUpstream(url=f"http://127.0.0.1:{port}")
    started = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        chaos.loop = loop
        server = loop.run_until_complete(asyncio.start_server(chaos.serve, "127.0.0.1", port))
        started.set()
        loop.run_forever()
        server.close()
        # Connections still open (kept alive by the proxy's pool) end with the server.
        serving = asyncio.all_tasks(loop)
        for task in serving:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*serving, return_exceptions=True))
        loop.close()

    chaos.thread = threading.Thread(target=run, name=f"chaos-{port}", daemon=True)
    chaos.thread.start()
    wait_until(started.is_set, timeout=10, what=f"the chaos upstream on {port}")
    return chaos
