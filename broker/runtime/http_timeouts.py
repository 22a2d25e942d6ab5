"""Read timeouts for slow clients (issue 19, item 14).

uvicorn waits for request headers and bodies as long as a client likes; a client that sends
half a request line, or a ``content-length`` it never delivers, holds a connection (and, for
a body, an application task) forever. Two guards:

* :class:`HeaderTimeoutProtocol`, uvicorn's httptools protocol (what ``--http auto`` picks
  with httptools installed) that closes a connection whose request headers are not complete
  within ``KEYBROKER_HEADER_TIMEOUT`` seconds of the connection opening or the request's
  first byte. ``serve`` selects it with
  ``--http broker.runtime.http_timeouts:HeaderTimeoutProtocol``.
* :func:`body_read_timeout`, an ASGI wrapper whose ``receive`` gives up when the next body
  chunk takes longer than ``KEYBROKER_BODY_READ_TIMEOUT`` seconds: it answers 408 with a JSON
  error if no response has started, and from then on tells the app the client is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from asyncio import TimerHandle
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from keybroker.wire import PROXY_PREFIX, is_proxy_path

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

_PROXY_PREFIX = PROXY_PREFIX.encode()
_HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 34\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"request headers took too long.\r\n\r\n"
)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose headers never finish, and
    leaving proxied calls out of the access log (their audit event says more)."""

    header_timeout_task: TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._access_log_wanted = self.access_log  # uvicorn's: its logger has a handler

    def _arm_header_timeout(self) -> None:
        if self.header_timeout_task is None:
            self.header_timeout_task = self.loop.call_later(
                settings.HEADER_TIMEOUT_SECONDS, self._header_timeout
            )

    def _disarm_header_timeout(self) -> None:
        if self.header_timeout_task is not None:
            self.header_timeout_task.cancel()
            self.header_timeout_task = None

    def _header_timeout(self) -> None:
        self.header_timeout_task = None
        if self.transport.is_closing():
            return
        logger.info("closing a connection from %s: request headers took too long", self.client)
        if self.cycle is None or self.cycle.response_complete:
            # Nothing else is being written on this connection: say why before closing.
            self.transport.write(_HEADER_TIMEOUT_RESPONSE)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a byte is held no longer than a slow request.
        self._arm_header_timeout()

    def on_response_complete(self) -> None:
        # The connection is idle now: uvicorn's keep-alive timeout takes over until the next
        # request's first byte, which arms this timeout again.
        self._disarm_header_timeout()
        super().on_response_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timeout()

    def on_headers_complete(self) -> None:
        self._disarm_header_timeout()
        # Formatting and writing the line cost a proxied call about a tenth of its own time
        # (docs/decisions.md, "No access log line for proxied calls").
        self.access_log = self._access_log_wanted and (
            settings.PROXY_ACCESS_LOG or not self.url.startswith(_PROXY_PREFIX)
        )
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timeout()
        super().connection_lost(exc)


def _timeout_body(path: str, seconds: int) -> bytes:
    message = f"the request body stalled: no data for {seconds}s"
    if is_proxy_path(path):
        # The shape the Anthropic SDKs parse, as every other proxy error.
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": "request_timeout", "message": message},
        }
    else:
        body = {"error": {"type": "request_timeout", "message": message}}
    return json.dumps(body).encode()


def body_read_timeout(app: App) -> App:
    """Wrap an ASGI app so that an HTTP request body arriving too slowly ends the request."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        seconds: int = settings.BODY_READ_TIMEOUT_SECONDS
        started = False  # a response began, by the app or by us
        body_done = False
        timed_out = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if timed_out:
                return  # the request is over; whatever the app still says goes nowhere
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def guarded_receive() -> Message:
            nonlocal body_done, timed_out, started
            if timed_out:
                return {"type": "http.disconnect"}
            if body_done:
                # After the body only a disconnect can come; waiting for it is no read.
                return await receive()
            try:
                # A timer, not wait_for's task per read: most bodies are there already.
                async with asyncio.timeout(seconds):
                    message = await receive()
            except TimeoutError:
                logger.info(
                    "request body from %s stalled for %ss: %s %s",
                    scope.get("client"),
                    seconds,
                    scope.get("method"),
                    scope.get("path"),
                )
                if not started:
                    started = True
                    body = _timeout_body(scope.get("path", ""), seconds)
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 408,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                timed_out = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await app(scope, guarded_receive, guarded_send)

    return guarded
