"""Publishing new audit events to the live feed (the Channels group of /ws/activity/).

A group message carries a list of events, so the recorder publishes a batch as one message:
a burst of thousands of calls is a handful of messages, and a viewer's channel (capacity
100 messages in channels-redis) never overflows and drops part of it.

Publishing is best effort by design: the row is already committed and the feed is a view
of it. A channel layer that is down or slow is logged and skipped, never raised. What was
skipped is not forgotten: the process's next message that goes out is preceded by an
``audit.missed`` one saying since when events are missing, and the page reloads them. A
feed socket that survived a short Redis freeze would otherwise never learn of the gap.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from audit.events import event_json
from audit.models import AuditEvent

logger = logging.getLogger(__name__)

ACTIVITY_GROUP = "audit.activity"
EVENT_TYPE = "audit.event"
# Long enough for a busy Redis, short enough that a black-holed one does not hold a caller.
PUBLISH_TIMEOUT_SECONDS = 2.0
# Bounds one group message (events are ~1 kB of JSON each).
EVENTS_PER_MESSAGE = 200


MISSED_TYPE = "audit.missed"


class _Missed:
    """The time of the oldest event this process could not publish, until it has said so."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # sync publishers run in many threads
        self._since: datetime | None = None

    def note(self, since: datetime) -> None:
        with self._lock:
            if self._since is None or since < self._since:
                self._since = since

    def pending(self) -> datetime | None:
        with self._lock:
            return self._since

    def said(self, since: datetime) -> None:
        with self._lock:
            if self._since == since:  # not if an older gap was noted meanwhile
                self._since = None


_missed = _Missed()


def _messages(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"type": EVENT_TYPE, "events": payloads[start : start + EVENTS_PER_MESSAGE]}
        for start in range(0, len(payloads), EVENTS_PER_MESSAGE)
    ]


async def audit_publish_async(events: Sequence[AuditEvent | dict[str, Any]]) -> bool:
    """Publish from an event loop; True when every message went out."""
    return await audit_publish_payloads([event_json(event) for event in events])


async def audit_publish_payloads(payloads: Sequence[dict[str, Any]]) -> bool:
    """Publish events already in their JSON form (``event_json``): the proxy's recorder
    builds them in its writer thread, so the event loop only sends them."""
    layer = get_channel_layer()
    if layer is None or not payloads:
        return True

    async def send(message: dict[str, Any]) -> None:
        await asyncio.wait_for(
            layer.group_send(ACTIVITY_GROUP, message), timeout=PUBLISH_TIMEOUT_SECONDS
        )

    try:
        since = _missed.pending()
        if since is not None:
            await send({"type": MISSED_TYPE, "since": since.isoformat()})
            _missed.said(since)
        for message in _messages(list(payloads)):
            await send(message)
    except Exception as exc:
        _missed.note(min(datetime.fromisoformat(p["created_at"]) for p in payloads))
        logger.warning(
            "live feed: %d audit event(s) not published (%s); they are stored all the same",
            len(payloads),
            type(exc).__name__,
        )
        return False
    return True


def audit_publish(events: Sequence[AuditEvent | dict[str, Any]]) -> bool:
    """Publish from sync code (web requests, Celery tasks, commands), after commit."""
    try:
        return bool(async_to_sync(audit_publish_async)(events))
    except RuntimeError as exc:
        # async_to_sync refuses to run in a thread whose event loop is busy (a test driving
        # a browser); the event is stored, only the live view misses it.
        logger.warning("live feed: audit event not published (%s)", exc)
        return False
