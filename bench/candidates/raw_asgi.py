"""``uvicorn bench.candidates.raw_asgi:application``: the same proxy with no Django at all.

What a proxy mounted beside Django in ``broker/project/asgi.py`` would cost: read the body, open
the upstream request, relay status, headers and each chunk, and watch for the client's
``http.disconnect`` (uvicorn's ``send`` after a disconnect returns silently, so without the
watcher a proxy learns of it only from the upstream, possibly minutes later).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bench.candidates.clients import from_env, response_headers, upstream_headers

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

CLIENT, UPSTREAM, KEY = from_env()
PREFIX = "/v1/proxy/"


async def _error(send: Send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    _backend, _, path = scope["path"].removeprefix(PREFIX).partition("/")
    if not scope["path"].startswith(PREFIX) or not path:
        await _error(send, 404, "not_found_error", "not found")
        return
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    query = scope["query_string"]
    url = f"{UPSTREAM}/{path}" + (f"?{query.decode('latin-1')}" if query else "")
    headers = upstream_headers(
        ((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]), KEY
    )
    try:
        answer = await CLIENT.open(scope["method"], url, headers, b"".join(parts))
    except Exception as exc:
        await _error(send, 502, "api_error", str(exc))
        return

    task = asyncio.current_task()
    assert task is not None
    state = {"done": False, "gone": False}

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state["done"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [*response_headers(answer.headers), (b"x-accel-buffering", b"no")],
            }
        )
        async for chunk in answer.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        state["done"] = True
        await send({"type": "http.response.body", "body": b""})
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
    finally:
        state["done"] = True
        watcher.cancel()
        await answer.aclose()
