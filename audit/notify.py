"""Alert deliveries (issue 17): sending an alert to the channels that want it.

A channel (audit/channels.py) is a generic webhook (JSON, signed with HMAC-SHA256), a
Slack-compatible incoming webhook (``{"text": …}``) or email addresses (Django's mail
settings). Each alert becomes a NotificationDelivery per subscribed channel, sent by a
Celery task that retries with backoff; each try is a DeliveryAttempt. docs/alerts.md has
the payload and how to verify the signature.

URLs are an admin's choice, so keybroker trusts them as it trusts a backend's base URL: it
refuses anything but http(s), never follows a redirect, and gives every request a time
limit, but it does not keep an admin from pointing alerts at an internal address
(docs/decisions.md, "Alerts").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from celery import signature
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from audit.models import (
    AlertEvent,
    ChannelKind,
    DeliveryAttempt,
    DeliveryState,
    NotificationChannel,
    NotificationDelivery,
)
from keybroker.wire import redact

logger = logging.getLogger(__name__)

DELIVER_TASK = "audit.tasks.notification_deliver_task"
SIGNATURE_HEADER = "X-Keybroker-Signature"
# A try gives up on a receiver after this long (the number of tries is a setting).
TIMEOUT_SECONDS = 10.0
# Answers that say "later": everything else in 4xx says the request itself is refused.
RETRIED_4XX = frozenset({408, 409, 425, 429})
# A task may run this early (clocks of workers differ a little).
EARLY = timedelta(seconds=5)
# While a try runs, no other task may start one: longer than any try takes.
TRYING = timedelta(minutes=2)
# A delivery this late for its next try has lost its task; the sweep queues it again.
OVERDUE = timedelta(minutes=5)
REQUEUE_BATCH = 500
SUBSCRIBABLE = tuple(event for event in AlertEvent.values if event != AlertEvent.TEST)


@dataclass(frozen=True)
class Alert:
    """What happened, for people (``text``, ``link``) and for programs (``data``)."""

    event: str
    text: str
    link: str = ""
    data: dict[str, Any] | None = None


# --- deliveries ------------------------------------------------------------------------------
def alert_payload(alert: Alert, delivery_id: str, at: str) -> dict[str, Any]:
    return {
        "id": delivery_id,
        "event": alert.event,
        "created_at": at,
        "text": alert.text,
        "link": alert.link or None,
        "data": alert.data or {},
    }


def channels_for(event: str) -> list[NotificationChannel]:
    # Channels are few: filtered here, since SQLite cannot look inside a JSON list.
    return [c for c in NotificationChannel.objects.filter(enabled=True) if event in c.events]


def deliveries_create(
    alert: Alert, *, channels: Sequence[NotificationChannel] | None = None
) -> list[NotificationDelivery]:
    """A delivery per channel subscribed to the alert, each sent once the caller commits."""
    targets = channels_for(alert.event) if channels is None else channels
    created = []
    for channel in targets:
        delivery = NotificationDelivery(channel=channel, event=alert.event)
        delivery.payload = alert_payload(alert, str(delivery.id), timezone.now().isoformat())
        delivery.save(force_insert=True)
        created.append(delivery)
    if created:
        ids = [str(d.id) for d in created]
        transaction.on_commit(lambda: _queue(ids))
    return created


def _queue(ids: list[str]) -> None:
    for delivery_id in ids:
        try:
            signature(DELIVER_TASK, args=(delivery_id,)).apply_async()
        except Exception as exc:
            # Stays pending; the sweep (deliveries_requeue) queues it again.
            logger.error("alert delivery %s not queued (%s)", delivery_id, type(exc).__name__)


def deliveries_requeue(*, now: datetime | None = None) -> int:
    """Queue again each delivery whose next try is long overdue: its task was never queued
    (Redis was down) or was lost with a worker. Returns how many."""
    cutoff = (now or timezone.now()) - OVERDUE
    overdue = NotificationDelivery.objects.filter(
        state__in=[DeliveryState.PENDING, DeliveryState.RETRYING], next_try_at__lt=cutoff
    ).order_by("next_try_at")
    ids = [str(pk) for pk in overdue.values_list("pk", flat=True)[:REQUEUE_BATCH]]
    if ids:
        logger.warning("%d alert delivery(ies) overdue; queued again", len(ids))
        _queue(ids)
    return len(ids)


def sign(secret: str, body: bytes, at: int) -> str:
    """``t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` (docs/alerts.md)."""
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


@dataclass(frozen=True)
class Outcome:
    status: int | None
    error: str
    retry: bool

    @property
    def ok(self) -> bool:
        return not self.error


def _post(channel: NotificationChannel, delivery: NotificationDelivery) -> Outcome:
    payload = delivery.payload
    if channel.kind == ChannelKind.SLACK:
        link = payload.get("link")
        text = payload["text"] + (f"\n<{link}|Open in keybroker>" if link else "")
        body = json.dumps({"text": text}).encode()
        headers = {"content-type": "application/json"}
    else:
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json",
            "x-keybroker-event": delivery.event,
            "x-keybroker-delivery": str(delivery.id),
            SIGNATURE_HEADER.lower(): sign(channel.signing_secret, body, int(time.time())),
        }
    headers["user-agent"] = f"keybroker/{settings.VERSION}"
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False, trust_env=False) as http:
            answer = http.post(channel.target, content=body, headers=headers)
    except httpx.TimeoutException:
        return Outcome(None, f"no answer within {TIMEOUT_SECONDS:g}s", retry=True)
    except httpx.HTTPError as exc:
        # The exception's text may quote the URL: only its kind is kept.
        return Outcome(None, f"could not reach the receiver ({type(exc).__name__})", retry=True)
    if 200 <= answer.status_code < 300:
        return Outcome(answer.status_code, "", retry=False)
    if 300 <= answer.status_code < 400:
        return Outcome(answer.status_code, "redirects are not followed", retry=False)
    retry = answer.status_code >= 500 or answer.status_code in RETRIED_4XX
    return Outcome(answer.status_code, f"the receiver answered {answer.status_code}", retry)


def _mail(channel: NotificationChannel, delivery: NotificationDelivery) -> Outcome:
    payload = delivery.payload
    body = payload["text"] + (f"\n\n{payload['link']}" if payload.get("link") else "")
    try:
        send_mail(
            subject=f"[keybroker] {payload['text'][:150]}",
            message=body,
            from_email=None,
            recipient_list=[a.strip() for a in channel.target.split(",")],
        )
    except Exception as exc:
        return Outcome(None, f"mail not sent ({type(exc).__name__})", retry=True)
    return Outcome(None, "", retry=False)


def delivery_attempt(*, delivery_id: str) -> float | None:
    """Try a delivery once and log the try; the seconds to wait before the next, or None
    when there is none (delivered, refused, out of tries, or gone)."""
    now = timezone.now()
    with transaction.atomic():
        delivery = (
            NotificationDelivery.objects.select_for_update()
            .select_related("channel")
            .filter(
                pk=delivery_id,
                state__in=[DeliveryState.PENDING, DeliveryState.RETRYING],
                next_try_at__lte=now + EARLY,
            )
            .first()
        )
        if delivery is None:
            return None  # gone, done, or not due: the task that owns the next try has it
        number = delivery.attempts + 1
        # Claimed: a second task for it (the sweep's, a redelivered one) finds it not due.
        NotificationDelivery.objects.filter(pk=delivery.pk).update(
            attempts=number, next_try_at=now + TRYING
        )
    channel = delivery.channel
    started = time.monotonic()
    send = _mail if channel.kind == ChannelKind.EMAIL else _post
    outcome = send(channel, delivery)
    duration_ms = (time.monotonic() - started) * 1000
    error = redact(outcome.error)[:300]
    last = number >= settings.ALERT_MAX_ATTEMPTS
    if outcome.ok:
        state = DeliveryState.DELIVERED
    elif outcome.retry and not last:
        state = DeliveryState.RETRYING
    else:
        state = DeliveryState.FAILED
    done = state in {DeliveryState.DELIVERED, DeliveryState.FAILED}
    with transaction.atomic():
        DeliveryAttempt.objects.create(
            delivery=delivery,
            number=number,
            status=outcome.status,
            error=error,
            duration_ms=duration_ms,
        )
        NotificationDelivery.objects.filter(pk=delivery.pk).update(
            state=state, last_error=error, finished_at=timezone.now() if done else None
        )
    if state == DeliveryState.FAILED:
        logger.warning(
            "alert %s to channel %s failed after %d attempt(s): %s",
            delivery.event, channel.pk, number, error,
        )  # fmt: skip
    if state != DeliveryState.RETRYING:
        return None
    wait = retry_delay(number)
    NotificationDelivery.objects.filter(pk=delivery.pk).update(
        next_try_at=timezone.now() + timedelta(seconds=wait)
    )
    return wait


def retry_delay(attempt: int) -> float:
    """Exponential backoff after the ``attempt``-th try, capped."""
    base = float(settings.ALERT_RETRY_BASE_SECONDS)
    return float(min(base * 2 ** (attempt - 1), settings.ALERT_RETRY_MAX_SECONDS))
