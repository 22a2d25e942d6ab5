"""Reading the audit trail: one set of filters for the API, the CLI, the page and the feed."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from audit.models import AuditEvent
from broker.infra.errors import ServiceError
from keybroker.wire import duration_parse

_STATUS_CLASS = re.compile(r"^([1-5])xx$")
_STATUS = re.compile(r"^(?:[1-5]\d\d|[1-5]xx)$")
FILTER_TEXT_LIMIT = 200


def audit_viewer(user: Any) -> bool:
    """Whether this user may read the trail outside the admin (the activity page and its
    live feed): staff holding ``view_auditevent``, as the admin's own audit pages ask."""
    return bool(
        user is not None
        and user.is_authenticated
        and user.is_active
        and user.is_staff
        and user.has_perm("audit.view_auditevent")
    )


def audit_time_parse(text: str, *, name: str, now: datetime | None = None) -> datetime:
    """``2026-11-23``, ``2026-11-23T10:00:00Z`` or a duration back from now: ``90s``, ``30m``,
    ``2h``, ``7d``. Times without a zone are UTC."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        seconds = duration_parse(text, units="smhd", unit_required=True)
        return (now or timezone.now()) - timedelta(seconds=seconds)
    try:
        moment = parse_datetime(text)
        day = None if moment else parse_date(text)
    except ValueError:
        moment = day = None
    if day is not None:
        moment = datetime(day.year, day.month, day.day)
    if moment is None:
        raise ServiceError(
            f"a date, an ISO 8601 time or a duration such as 30m, 2h, 7d; not {text!r}", name
        )
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=UTC)
    return moment


def _patterns(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def action_matches(action: str, patterns: list[str]) -> bool:
    """``token.revoked`` matches itself; ``token.*`` matches every ``token.`` action."""
    return any(action.startswith(p[:-1]) if p.endswith(".*") else action == p for p in patterns)


@dataclass(frozen=True)
class AuditFilter:
    """Every filter is optional; given ones must all hold. Text filters are exact."""

    agent: str = ""
    agent_id: str = ""  # one agent, whatever its name (names are reused after an unenroll)
    backend: str = ""
    action: str = ""  # comma-separated; ``token.*`` for a family
    status: str = ""  # 429, or a class: 4xx
    outcome: str = ""
    token: str = ""  # a token id or display prefix
    model: str = ""
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def parse(cls, params: Mapping[str, Any], *, now: datetime | None = None) -> AuditFilter:
        """From query parameters or CLI options; a bad value is a ServiceError naming it."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = params.get(field.name)
            if raw in (None, ""):
                continue
            if not isinstance(raw, str):
                raise ServiceError("a string", field.name)
            if len(raw) > FILTER_TEXT_LIMIT:
                raise ServiceError(f"at most {FILTER_TEXT_LIMIT} characters", field.name)
            if field.name in {"since", "until"}:
                values[field.name] = audit_time_parse(raw, name=field.name, now=now)
            else:
                values[field.name] = raw.strip()
        if "agent_id" in values:
            try:
                values["agent_id"] = str(uuid.UUID(values["agent_id"]))
            except ValueError:
                raise ServiceError("an agent's id (a UUID)", "agent_id") from None
        status = values.get("status", "")
        if status and not _STATUS.match(status):
            raise ServiceError(
                f"a code such as 429 or a class such as 4xx; not {status!r}", "status"
            )
        return cls(**values)

    def as_params(self) -> dict[str, str]:
        params = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value:
                params[field.name] = value.isoformat() if isinstance(value, datetime) else value
        return params


def audit_events(audit_filter: AuditFilter | None = None) -> QuerySet[AuditEvent]:
    """Newest first, narrowed by the filter."""
    f = audit_filter or AuditFilter()
    events = AuditEvent.objects.all()
    for name in ("agent", "agent_id", "backend", "outcome", "model"):
        value = getattr(f, name)
        if value:
            events = events.filter(**{name: value})
    if f.action:
        wanted = Q()
        for pattern in _patterns(f.action):
            if pattern.endswith(".*"):
                wanted |= Q(action__startswith=pattern[:-1])
            else:
                wanted |= Q(action=pattern)
        events = events.filter(wanted)
    if f.status:
        status_class = _STATUS_CLASS.match(f.status)
        if status_class:
            low = int(status_class[1]) * 100
            events = events.filter(status__gte=low, status__lt=low + 100)
        else:
            events = events.filter(status=int(f.status))
    if f.token:
        events = events.filter(Q(token_id=f.token) | Q(token_prefix=f.token))
    if f.since:
        events = events.filter(created_at__gte=f.since)
    if f.until:
        events = events.filter(created_at__lt=f.until)
    return events


@dataclass(frozen=True)
class FeedFilter:
    """What a live-feed viewer asked to see: the same meaning as AuditFilter, in memory."""

    agent: str = ""
    backend: str = ""
    action: str = ""

    def matches(self, event: Mapping[str, Any]) -> bool:
        if self.agent and event.get("agent") != self.agent:
            return False
        if self.backend and event.get("backend") != self.backend:
            return False
        return not self.action or action_matches(str(event.get("action")), _patterns(self.action))
