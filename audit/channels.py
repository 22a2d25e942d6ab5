"""Alert channels (issue 17): adding, listing, testing and removing where alerts go.

The REST API, the admin and ``manage.py notify`` all call these. Adding and removing a
channel are audit events (``alerts.channel_added`` / ``alerts.channel_removed``) naming its
kind and the displayed target, never the URL or the signing secret.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.validators import validate_email
from django.db import transaction

from audit.models import AlertEvent, ChannelKind, NotificationChannel, NotificationDelivery
from audit.notify import SUBSCRIBABLE, Alert, deliveries_create
from audit.services import actor_of, audit_record
from broker.infra.errors import NotFound, Problems, ServiceError

logger = logging.getLogger(__name__)

SIGNING_PREFIX = "ckw"
MAX_TARGET = 2000
MAX_RECIPIENTS = 20

User = AbstractBaseUser | AnonymousUser | None


@dataclass(frozen=True)
class CreatedChannel:
    channel: NotificationChannel
    signing_secret: str  # shown once; "" for kinds that sign nothing


def _clean_url(url: str, field: str = "url") -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ServiceError("give an http:// or https:// URL", field)
    if len(url) > MAX_TARGET:
        raise ServiceError(f"use at most {MAX_TARGET} characters", field)
    return url


def _url_display(url: str) -> str:
    """Scheme and host, and the path's last four characters: enough to tell channels
    apart, never the path or query that may be the credential (Slack's is)."""
    parts = urlsplit(url)
    rest = (parts.path + (f"?{parts.query}" if parts.query else "")).strip("/")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}/" + (f"…{rest[-4:]}" if len(rest) > 4 else "…")


def _clean_addresses(text: str) -> list[str]:
    addresses = [a.strip() for a in text.replace(";", ",").split(",") if a.strip()]
    if not addresses:
        raise ServiceError("give at least one email address", "url")
    if len(addresses) > MAX_RECIPIENTS:
        raise ServiceError(f"give at most {MAX_RECIPIENTS} addresses", "url")
    for address in addresses:
        try:
            validate_email(address)
        except Exception:
            raise ServiceError(f"{address[:100]!r} is not an email address", "url") from None
    return addresses


def clean_events(events: Iterable[str]) -> list[str]:
    wanted = [e.strip() for e in events if isinstance(e, str) and e.strip()]
    if not wanted:
        raise ServiceError(f"name at least one of {', '.join(SUBSCRIBABLE)}", "events")
    unknown = [e for e in wanted if e not in SUBSCRIBABLE]
    if unknown:
        raise ServiceError(
            f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(SUBSCRIBABLE)}",
            "events",
        )
    return list(dict.fromkeys(wanted))


@transaction.atomic
def channel_create(
    *, kind: str, url: str, events: Iterable[str], by: User = None
) -> CreatedChannel:
    """A new channel; for a webhook, its signing secret is generated and returned once."""
    problems = Problems()
    target = display = ""
    wanted: list[str] = []
    with problems.check():
        if kind not in ChannelKind.values:
            raise ServiceError(f"choose from {', '.join(ChannelKind.values)}", "kind")
    with problems.check():
        if kind == ChannelKind.EMAIL:
            addresses = _clean_addresses(url)
            target = display = ", ".join(addresses)
            display = display[:300]
        else:
            target = _clean_url(url)
            display = _url_display(target)
    with problems.check():
        wanted = clean_events(events)
    problems.raise_if_any()
    signing = ""
    if kind == ChannelKind.WEBHOOK:
        signing = f"{SIGNING_PREFIX}_{secrets.token_urlsafe(32)}"
    channel = NotificationChannel.objects.create(
        kind=kind,
        target=target,
        target_display=display,
        signing_secret=signing,
        secret_hint=f"{SIGNING_PREFIX}_…{signing[-4:]}" if signing else "",
        events=wanted,
        created_by=actor_of(by)[1],
    )
    audit_record(
        action="alerts.channel_added",
        by=by,
        channel=channel.pk,
        kind=kind,
        target=display,
        events=wanted,
    )
    return CreatedChannel(channel, signing)


def channel_get(*, channel_id: int | str) -> NotificationChannel:
    channel = (
        NotificationChannel.objects.filter(pk=channel_id).first()
        if str(channel_id).isdigit()
        else None
    )
    if channel is None:
        raise NotFound(f"no alert channel {str(channel_id)[:40]!r}")
    return channel


@transaction.atomic
def channel_update(
    *,
    channel: NotificationChannel,
    enabled: bool | None = None,
    events: Iterable[str] | None = None,
    by: User = None,
) -> NotificationChannel:
    """Pause or resume a channel, or change what it subscribes to (None: unchanged). Its
    URL and secret cannot change: a new one is a new channel."""
    changed: dict[str, Any] = {}
    if events is not None:
        wanted = clean_events(events)
        if wanted != channel.events:
            channel.events = changed["events"] = wanted
    if enabled is not None and enabled != channel.enabled:
        channel.enabled = changed["enabled"] = enabled
    if changed:
        channel.save(update_fields=list(changed))
        audit_record(
            action="alerts.channel_updated",
            by=by,
            channel=channel.pk,
            target=channel.target_display,
            **changed,
        )
    return channel


@transaction.atomic
def channel_remove(*, channel: NotificationChannel, by: User = None) -> None:
    """Remove the channel and its delivery log; deliveries still queued find it gone."""
    audit_record(
        action="alerts.channel_removed",
        by=by,
        channel=channel.pk,
        kind=channel.kind,
        target=channel.target_display,
    )
    channel.delete()


def channel_test(*, channel: NotificationChannel) -> NotificationDelivery:
    """Send a ``test`` alert to this channel now (queued like any other)."""
    alert = Alert(
        event=AlertEvent.TEST,
        text=f"keybroker test alert: this {channel.kind} channel works",
        link=f"{settings.PUBLIC_URL}/admin/",
    )
    return deliveries_create(alert, channels=[channel])[0]
