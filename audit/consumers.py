"""The live activity feed: ``/ws/activity/``, for staff who may view audit events.

Protocol (JSON text frames):

- server → client ``{"type": "audit.event", "event": {...}}`` for each new event that passes
  the viewer's filters (the fields of audit/events.py, never content or a secret);
- client → server ``{"type": "filter", "agent": "bob", "backend": "", "action": "token.*"}``
  to narrow the feed (empty or missing means "any"); answered with
  ``{"type": "filter", ...}`` echoing what is now in force;
- server → client ``{"type": "error", "message": "..."}`` for a frame it cannot use.

The socket is refused during the handshake (HTTP 403) for anonymous users, non-staff and
staff without ``audit.view_auditevent`` (the admin's own rule for the trail);
``SameOriginOnly`` (audit/routing.py, wired in broker/project/asgi.py) refuses before that any
``Origin`` that is not the broker's own scheme, host and port, and a missing one.
"""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from audit.publish import ACTIVITY_GROUP
from audit.selectors import FILTER_TEXT_LIMIT, FeedFilter, audit_viewer

FILTER_FIELDS = ("agent", "backend", "action")


class ActivityConsumer(AsyncJsonWebsocketConsumer):
    filters: FeedFilter
    joined: bool = False

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

    async def audit_event(self, message: dict[str, Any]) -> None:
        """A group message from audit/publish.py: one or more new events."""
        for event in message.get("events", []):
            if self.filters.matches(event):
                await self.send_json({"type": "audit.event", "event": event})
