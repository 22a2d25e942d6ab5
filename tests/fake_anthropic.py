"""A fake Anthropic API on a real socket, speaking the real wire format.

It records every request (method, path, headers) so tests can assert what reached the
upstream, and can be told which keys are valid, which are forbidden and how long to hang.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

OAUTH_BETA = "oauth-2025-04-20"
MODELS = [
    {
        "type": "model",
        "id": "claude-sonnet-4-5-20250929",
        "display_name": "Claude Sonnet 4.5",
        "created_at": "2025-09-29T00:00:00Z",
    },
    {
        "type": "model",
        "id": "claude-haiku-4-5-20251001",
        "display_name": "Claude Haiku 4.5",
        "created_at": "2025-10-01T00:00:00Z",
    },
]


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeAnthropic:
    valid_keys: set[str] = field(default_factory=set)
    forbidden_keys: set[str] = field(default_factory=set)
    hang_seconds: float = 0.0
    requests: list[SeenRequest] = field(default_factory=list)
    url: str = ""

    def reset(self) -> None:
        self.valid_keys.clear()
        self.forbidden_keys.clear()
        self.hang_seconds = 0.0
        self.requests.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append(
            SeenRequest(
                scope["method"], scope["path"], scope["query_string"].decode(), headers, body
            )
        )
        if self.hang_seconds:
            await asyncio.sleep(self.hang_seconds)
        status, payload = self._route(scope["method"], scope["path"], headers)
        await self._json(send, status, payload)

    def _credential(self, headers: dict[str, str]) -> tuple[str, str] | None:
        if "x-api-key" in headers:
            return "x-api-key", headers["x-api-key"]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return "bearer", auth[7:]
        return None

    def _route(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        credential = self._credential(headers)
        if credential is None:
            return 401, error("authentication_error", "x-api-key header is required")
        scheme, secret = credential
        if scheme == "bearer" and OAUTH_BETA not in headers.get("anthropic-beta", ""):
            return 401, error(
                "authentication_error", "OAuth authentication is currently not supported."
            )
        if secret in self.forbidden_keys:
            return 403, error(
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
            )
        if secret not in self.valid_keys:
            return 401, error("authentication_error", "invalid x-api-key")
        if method == "GET" and path == "/v1/models":
            return 200, {
                "data": MODELS,
                "has_more": False,
                "first_id": MODELS[0]["id"],
                "last_id": MODELS[-1]["id"],
            }
        return 404, error("not_found_error", f"Not found: {path}")

    @staticmethod
    async def _json(send: Send, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"request-id", f"req_{uuid.uuid4().hex[:24]}".encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def error(error_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": f"req_{uuid.uuid4().hex[:24]}",
    }


def serve_in_thread(app: Any, port: int) -> uvicorn.Server:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True).start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return server
