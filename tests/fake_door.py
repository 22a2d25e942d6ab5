"""A TCP door in front of the fake upstream, for what an HTTP framework cannot do: drop a
connection without answering.

Each request that comes through the door is read (its head and Content-Length body) and
relayed byte for byte to the fake Anthropic on a connection of its own, whose answers flow
back unparsed. Each of the next ``drop_next`` requests never reaches the fake: its
connection is reset (TCP RST) instead, as a crashed upstream, a failing load balancer or a
middlebox does, so the proxy sees the call fail before any answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

from tests.waiting import wait_until


@dataclass
class FakeDoor:
    target_port: int
    url: str = ""
    drop_next: int = 0
    dropped: list[str] = field(default_factory=list)  # the key of each request reset
    relayed: int = 0
    # The door's own failures: requests it could not read. Tests check it is empty.
    failures: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None

    def reset(self) -> None:
        self.drop_next = 0
        self.dropped.clear()
        self.relayed = 0
        self.failures.clear()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay: asyncio.StreamWriter | None = None
        back: asyncio.Future[None] | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                headers = _headers(head)
                if "chunked" in headers.get("transfer-encoding", ""):
                    self.failures.append("a chunked request body (the door reads lengths only)")
                    return
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                if self.drop_next > 0:
                    self.drop_next -= 1
                    self.dropped.append(headers.get("x-api-key", ""))
                    _reset(writer)
                    return
                if relay is None:
                    answers, relay = await asyncio.open_connection("127.0.0.1", self.target_port)
                    back = asyncio.ensure_future(_pipe(answers, writer))
                relay.write(head + body)
                await relay.drain()
                self.relayed += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if relay is not None:
                relay.close()
            if back is not None:
                back.cancel()
            writer.close()

    def stop(self) -> None:
        assert self.loop is not None
        assert self.thread is not None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return headers


async def _pipe(answers: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The fake's answers back to the proxy as they come; its close closes the door's."""
    with contextlib.suppress(ConnectionError):
        while chunk := await answers.read(65536):
            writer.write(chunk)
            await writer.drain()
    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN: the other side's read fails at once."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def door_in_thread(port: int, target_port: int) -> FakeDoor:
    """Start a FakeDoor on 127.0.0.1:``port`` to ``target_port``; stop() ends it."""
    door = FakeDoor(target_port=target_port, url=f"http://127.0.0.1:{port}")
    started = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        door.loop = loop
        server = loop.run_until_complete(asyncio.start_server(door.serve, "127.0.0.1", port))
        started.set()
        loop.run_forever()
        server.close()
        # Connections still open (kept alive by the proxy's pool) end with the door.
        serving = asyncio.all_tasks(loop)
        for task in serving:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*serving, return_exceptions=True))
        loop.close()

    door.thread = threading.Thread(target=run, name=f"fake-door-{port}", daemon=True)
    door.thread.start()
    wait_until(started.is_set, timeout=10, what=f"the fake door to listen on {port}")
    return door
