"""The audit trail for a SIEM: every event in write order, as JSON lines or ArcSight CEF,
one at a time (never the whole table in memory)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from audit.events import event_json
from audit.models import AuditEvent
from broker import __version__

EXPORT_CHUNK = 2000
FORMATS = ("jsonl", "cef")
# What a SIEM should not file with the routine events (CEF severity 0-10).
SEVERITY = {"auth.failed": 6, "policy.denied": 5, "backend.invalid": 6, "token.revoked": 4}
DEFAULT_SEVERITY = 3


def audit_export_events(
    *, since: datetime | None = None, until: datetime | None = None
) -> Iterator[AuditEvent]:
    events = AuditEvent.objects.order_by("chain_seq", "id")
    if since is not None:
        events = events.filter(created_at__gte=since)
    if until is not None:
        events = events.filter(created_at__lt=until)
    return events.iterator(chunk_size=EXPORT_CHUNK)


def jsonl_line(event: AuditEvent) -> str:
    data = event_json(event)
    data["chain_seq"] = event.chain_seq
    data["chain_hash"] = event.chain_hash
    return json.dumps(data, default=str, separators=(",", ":"))


def _header(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _extension(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("=", "\\=")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def cef_line(event: AuditEvent) -> str:
    """``CEF:0|keybroker|keybroker|VERSION|action|action|severity|key=value ...``."""
    pairs: list[tuple[str, Any]] = [
        ("rt", int(event.created_at.timestamp() * 1000)),
        ("externalId", event.pk),
        ("act", event.action),
        ("suser", event.actor),
        ("cs1Label", "agent"),
        ("cs1", event.agent),
        ("cs2Label", "backend"),
        ("cs2", event.backend),
        ("src", event.client_address),
        ("requestMethod", event.method),
        ("request", event.path),
        ("outcome", event.outcome),
        ("cn1Label", "status"),
        ("cn1", event.status),
        ("cs3Label", "model"),
        ("cs3", event.model),
        ("cs4Label", "tokenPrefix"),
        ("cs4", event.token_prefix),
        ("cs5Label", "policyReason"),
        ("cs5", event.policy_reason),
        ("msg", event.message),
        ("cn2Label", "chainSeq"),
        ("cn2", event.chain_seq),
        ("cs6Label", "chainHash"),
        ("cs6", event.chain_hash),
    ]
    # A label without its value says nothing: both go when the value is empty.
    present = {key for key, value in pairs if value not in (None, "")}
    extension = " ".join(
        f"{key}={_extension(value)}"
        for key, value in pairs
        if (key[: -len("Label")] if key.endswith("Label") else key) in present
    )
    severity = SEVERITY.get(event.action, DEFAULT_SEVERITY)
    action = _header(event.action)
    return (
        f"CEF:0|keybroker|keybroker|{_header(__version__)}|{action}|{action}|{severity}|{extension}"
    )


LINE_OF: dict[str, Callable[[AuditEvent], str]] = {"jsonl": jsonl_line, "cef": cef_line}


def audit_export(
    *, format: str, since: datetime | None = None, until: datetime | None = None
) -> Iterator[str]:
    line = LINE_OF[format]
    for event in audit_export_events(since=since, until=until):
        yield line(event)
