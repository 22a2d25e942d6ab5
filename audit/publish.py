"""Publishing new audit events to the live feed (the Channels group of /ws/activity/).

A group message carries a list of events, so the recorder publishes a batch as one message:
a burst of thousands of calls is a handful of messages, and a viewer's channel (capacity
100 messages in channels-redis) never overflows and drops part of it.

Publishing is best effort by design: the row is already committed and the feed is a view
of it. A channel layer that is down or slow is logged and skipped, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
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


def _messages(events: Sequence[AuditEvent | dict[str, Any]]) -> list[dict[str, Any]]:
    payloads = [event_json(event) for event in events]
    return [
        {"type": EVENT_TYPE, "events": payloads[start : start + EVENTS_PER_MESSAGE]}
        for start in range(0, len(payloads), EVENTS_PER_MESSAGE)
    ]


async def audit_publish_async(events: Sequence[AuditEvent | dict[str, Any]]) -> bool:
    """Publish from an event loop (the proxy's recorder); True when every message went out."""
    layer = get_channel_layer()
    if layer is None or not events:
        return True
    try:
        for message in _messages(events):
            await asyncio.wait_for(
                layer.group_send(ACTIVITY_GROUP, message), timeout=PUBLISH_TIMEOUT_SECONDS
            )
    except Exception as exc:
        logger.warning(
            "live feed: %d audit event(s) not published (%s); they are stored all the same",
            len(events),
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
