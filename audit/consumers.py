"""The live activity feed: ``/ws/activity/``, for staff who may view audit events.

Protocol (JSON text frames):

- server → client ``{"type": "audit.event", "event": {...}}`` for each new event that passes
  the viewer's filters (the fields of audit/events.py, never content or a secret);
- client → server ``{"type": "filter", "agent": "bob", "backend": "", "action": "token.*"}``
  to narrow the feed (empty or missing means "any"); answered with
  ``{"type": "filter", ...}`` echoing what is now in force;
- server → client ``{"type": "error", "message": "..."}`` for a frame it cannot use;
- server → client ``{"type": "held", "event": {...}}`` for every ``proxy.held`` and
  ``proxy.hold_decided`` event whatever the filters: the page's held calls, with their
  Approve and Deny buttons, follow them (docs/decisions.md, "Held calls");
- server → client ``{"type": "missed", "since": "<ISO time>"}`` when a process could not
  publish events made since then (Redis failed for a moment under a socket that stayed
  open): they are in the trail, and the page reloads it (audit/publish.py).

The socket is refused during the handshake (HTTP 403) for anonymous users, non-staff and
staff without ``audit.view_auditevent`` (the admin's own rule for the trail);
``SameOriginOnly`` (audit/routing.py, wired in broker/project/asgi.py) refuses before that any
``Origin`` that is not the broker's own scheme, host and port, and a missing one.

When the channel layer fails under an open socket (Redis stopped, or frozen past the
client's read timeout), the socket is closed with 1013 (try again later) instead of dying
with a traceback: the page reconnects with backoff and reloads what it missed meanwhile
(docs/decisions.md, "The live feed across a Redis outage").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import redis
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from audit.publish import ACTIVITY_GROUP
from audit.selectors import FILTER_TEXT_LIMIT, FeedFilter, audit_viewer

FILTER_FIELDS = ("agent", "backend", "action")
HELD_ACTIONS = frozenset({"proxy.held", "proxy.hold_decided"})
# "Try again later": the page reconnects on any close, a client reading codes knows why.
CLOSE_LAYER_FAILED = 1013
# Leaving the group is best effort once the layer has failed: a frozen Redis must not hold
# the closing socket.
DISCARD_TIMEOUT_SECONDS = 1.0
LAYER_ERRORS = (redis.RedisError, OSError, TimeoutError)

logger = logging.getLogger(__name__)


class ActivityConsumer(AsyncJsonWebsocketConsumer):
    filters: FeedFilter
    joined: bool = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except LAYER_ERRORS as exc:
            # Raised by the layer's receive (or group_add during connect). The socket's group
            # membership may be gone with it (a restarted Redis keeps no keys), so staying
            # open would be silently dead: close, and let the page reconnect and catch up.
            logger.warning(
                "live feed: channel layer failed (%s); closing the socket so the page reconnects",
                type(exc).__name__,
            )
            with contextlib.suppress(OSError, RuntimeError):  # the client may be gone too
                await self.close(code=CLOSE_LAYER_FAILED)
            if self.joined:
                with contextlib.suppress(*LAYER_ERRORS):
                    async with asyncio.timeout(DISCARD_TIMEOUT_SECONDS):
                        await self.channel_layer.group_discard(ACTIVITY_GROUP, self.channel_name)

    async def connect(self) -> None:
        if not await database_sync_to_async(audit_viewer)(self.scope.get("user")):
            await self.close()  # before accept: the handshake is refused
            return
        self.filters = FeedFilter()
        await self.channel_layer.group_add(ACTIVITY_GROUP, self.channel_name)
        self.joined = True
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.joined:
            await self.channel_layer.group_discard(ACTIVITY_GROUP, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            content = json.loads(text_data or "")
        except ValueError:
            await self.send_json({"type": "error", "message": "frames are JSON objects"})
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict) or content.get("type") != "filter":
            await self.send_json({"type": "error", "message": 'send {"type": "filter", ...}'})
            return
        unknown = sorted(set(content) - {"type", *FILTER_FIELDS})
        chosen = {name: content.get(name) or "" for name in FILTER_FIELDS}
        bad = [name for name, value in chosen.items() if not isinstance(value, str)]
        bad += [name for name, value in chosen.items() if len(str(value)) > FILTER_TEXT_LIMIT]
        if unknown or bad:
            message = f"unusable filter field(s): {', '.join(unknown + bad)}"
            await self.send_json({"type": "error", "message": message})
            return
        self.filters = FeedFilter(**{name: value.strip() for name, value in chosen.items()})
        await self.send_json({"type": "filter", **chosen})

    async def audit_missed(self, message: dict[str, Any]) -> None:
        """A group message from audit/publish.py: events since then were not published."""
        await self.send_json({"type": "missed", "since": message.get("since", "")})

    async def audit_event(self, message: dict[str, Any]) -> None:
        """A group message from audit/publish.py: one or more new events."""
        for event in message.get("events", []):
            if event.get("action") in HELD_ACTIONS:
                await self.send_json({"type": "held", "event": event})
            if self.filters.matches(event):
                await self.send_json({"type": "audit.event", "event": event})
