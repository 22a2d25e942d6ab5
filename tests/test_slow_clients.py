"""Slow clients are not held forever: request headers and bodies have read timeouts
(issue 19, item 14). Raw sockets against a real uvicorn, started as `serve` starts it."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Iterator

import anthropic
import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.test import override_settings

from broker.runtime.http_timeouts import Message, Receive, Scope, Send, body_read_timeout
from broker.runtime.serve import uvicorn_command
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import proxied_for
from tests.servers import process_env, uvicorn_serving

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

HTTP_PROTOCOL = "broker.runtime.http_timeouts:HeaderTimeoutProtocol"
TIMEOUT = 1  # seconds, both timeouts, set through the environment


def test_serve_selects_the_header_timeout_protocol() -> None:
    command = uvicorn_command("python", host="127.0.0.1", port=8400, workers=1)
    assert command[command.index("--http") + 1] == HTTP_PROTOCOL


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    """A keybroker web process on the test database and Redis, with 1 s read timeouts."""
    port = free_port()
    env = process_env(
        KEYBROKER_PUBLIC_URL=f"http://127.0.0.1:{port}",
        KEYBROKER_HEADER_TIMEOUT=str(TIMEOUT),
        KEYBROKER_BODY_READ_TIMEOUT=str(TIMEOUT),
    )
    with uvicorn_serving(port=port, env=env):
        yield "127.0.0.1", port


def read_until_closed(sock: socket.socket, *, limit: float = 6.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    sock.settimeout(limit)
    start = time.monotonic()
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server still held the connection after {limit}s: {received!r}")
    except ConnectionResetError:
        pass
    return received, time.monotonic() - start


def test_headers_that_never_finish_are_cut_off(server: tuple[str, int]) -> None:
    host, port = server
    with socket.create_connection(server) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: ".encode())
        received, waited = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert waited < TIMEOUT + 2


def test_a_connection_that_sends_nothing_is_closed(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        received, waited = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert waited < TIMEOUT + 2


def test_a_trickle_of_header_bytes_does_not_reset_the_timeout(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        try:
            for _ in range(int(TIMEOUT * 10)):
                sock.sendall(b"X-Drip: 1\r\n")
                time.sleep(0.3)  # the trickle: a header line now and then, never the end
        except (BrokenPipeError, ConnectionResetError):
            pass
        read_until_closed(sock)
    assert time.monotonic() - start < TIMEOUT + 2


def test_complete_requests_on_a_kept_alive_connection_are_served(server: tuple[str, int]) -> None:
    host, port = server
    with socket.create_connection(server, timeout=5) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            assert reader.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            time.sleep(TIMEOUT * 0.6)  # idle between requests is keep-alive's business


def test_an_idle_connection_outlives_the_sdks_own_keep_alive(server: tuple[str, int]) -> None:
    """The SDK reuses an idle connection until its keepalive_expiry; a server that closed it
    sooner would race the SDK's next call (docs/decisions.md, "Idle connections")."""
    sdk_expiry = anthropic.DEFAULT_CONNECTION_LIMITS.keepalive_expiry
    assert sdk_expiry is not None
    connection = http.client.HTTPConnection(*server, timeout=5)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().read()
        kept = connection.sock
        time.sleep(sdk_expiry + 0.5)
        # http.client sends on the socket it holds: had the server closed it, this raises.
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert (response.status, connection.sock) == (200, kept)
    finally:
        connection.close()


def stalled_post(server: tuple[str, int], path: str, headers: str, partial: bytes) -> bytes:
    host, port = server
    with socket.create_connection(server) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
            + partial
        )
        received, waited = read_until_closed(sock)
    assert waited < TIMEOUT + 3
    return received


def response_json(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_stalled_body_on_the_agent_api_gets_408(server: tuple[str, int]) -> None:
    status, body = response_json(stalled_post(server, "/v1/enroll", "", b'{"name": "bo'))
    assert status == 408
    assert body == {
        "error": {
            "type": "request_timeout",
            "message": f"the request body stalled: no data for {TIMEOUT}s",
        }
    }


def test_a_stalled_body_on_the_proxy_gets_408(
    server: tuple[str, int], fake_anthropic: FakeAnthropic, alice: AbstractBaseUser
) -> None:
    host, port = server
    proxied = proxied_for(live_url=f"http://{host}:{port}", fake=fake_anthropic, alice=alice)
    raw = stalled_post(
        server,
        "/v1/proxy/anthropic/v1/messages",
        f"x-api-key: {proxied.token}\r\nanthropic-version: 2023-06-01\r\n",
        b'{"model": "claude',
    )
    status, body = response_json(raw)
    assert status == 408, raw
    assert body["type"] == "error"
    assert body["error"] == {
        "type": "request_timeout",
        "message": f"the request body stalled: no data for {TIMEOUT}s",
    }
    assert fake_anthropic.requests == []


def test_a_slow_body_that_keeps_coming_is_read(server: tuple[str, int]) -> None:
    host, port = server
    body = json.dumps({"name": "slowpoke", "scopes": []}).encode()
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(
            f"POST /v1/enroll HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        # Longer in all than the timeout, but never silent for as long.
        for start in range(0, len(body), 8):
            sock.sendall(body[start : start + 8])
            time.sleep(TIMEOUT * 0.4)
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1] == b"400"  # the enrollment's own answer: no scopes


@override_settings(BODY_READ_TIMEOUT_SECONDS=0.2)
async def test_a_body_that_stalls_after_the_response_began_reads_as_a_disconnect() -> None:
    """An app that answers while it still reads (a streamed upload) is told the client left,
    and nothing it sends afterwards reaches the server: no 408 in the middle of a response."""
    chunks: list[Message] = [{"type": "http.request", "body": b"{", "more_body": True}]
    sent: list[Message] = []
    seen: list[Message] = []

    async def client_receive() -> Message:
        if chunks:
            return chunks.pop(0)
        await asyncio.sleep(3600)  # the client never sends the rest
        raise AssertionError("unreachable")

    async def server_send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):  # the chunk, the timeout, and a disconnect from then on
            seen.append(await receive())
        await send({"type": "http.response.body", "body": b"late"})

    scope: Scope = {"type": "http", "method": "POST", "path": "/v1/enroll", "client": None}
    await asyncio.wait_for(body_read_timeout(app)(scope, client_receive, server_send), 5)
    assert [message["type"] for message in seen] == [
        "http.request",
        "http.disconnect",
        "http.disconnect",
    ]
    assert sent == [{"type": "http.response.start", "status": 200, "headers": []}]
