"""The shape of an audit event: which keyword goes to which column, and its JSON form.

Both recorder doors (``audit_record`` for sync code, ``audit_enqueue`` for the proxy's
event loop) build their rows here, so a field means the same thing whoever records it.
Every value is cut to its column's size and coerced to its type *before* it is queued: a
row the database would refuse must never sit at the head of the recorder's queue.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from audit.models import AuditEvent
from keybroker.wire import redact

# The actions keybroker records today, for pickers and docs; the column takes any name.
KNOWN_ACTIONS = (
    "proxy.request", "policy.denied", "auth.failed", "agent.enrolled", "agent.approved",
    "agent.rejected", "agent.request_rejected", "agent.scopes_requested", "agent.unenrolled",
    "grant.added", "token.issued", "token.revoked", "token.expired", "backend.added",
    "backend.updated", "backend.rotated", "backend.removed", "backend.validated",
    "backend.invalid", "backend.unreachable", "admintoken.created", "admintoken.revoked",
    "oidc.client_created", "oidc.token_issued", "oidc.key_rotated", "encryption_key.rotated",
    "oidc.identity_token_issued", "identity.granted", "identity.updated", "identity.revoked",
    "backend.token_exchanged", "backend.token_exchange_failed", "backend.key_added",
    "backend.key_enabled", "backend.key_disabled", "backend.key_updated", "backend.key_removed",
    "budget.threshold", "agent.spike", "alerts.channel_added",
    "alerts.channel_updated", "alerts.channel_removed",
    "proxy.held", "proxy.hold_decided",
)  # fmt: skip

# Keyword → column, for the fields that have one. Callers keep the names they already
# use (``token`` for a display prefix); anything else lands in ``detail``.
COLUMN_OF = {
    "token_id": "token_id",
    "token": "token_prefix",
    "token_prefix": "token_prefix",
    "method": "method",
    "path": "path",
    "model": "model",
    "system_prompt": "system_prompt",
    "streamed": "streamed",
    "status": "status",
    "outcome": "outcome",
    "request_id": "request_id",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "stop_reason": "stop_reason",
    "ttfb_ms": "ttfb_ms",
    "duration_ms": "duration_ms",
    "cost_usd": "cost_usd",
    "policy_result": "policy_result",
    "policy_reason": "policy_reason",
}
# The sync door serves the broker's services, whose ``method`` means "which kind of
# credential" (auth.failed), not an HTTP method: only token fields become columns there.
RECORD_COLUMNS = frozenset({"token_id", "token", "token_prefix"})
PROXY_COLUMNS = frozenset(COLUMN_OF)

_TEXT_LIMITS = {
    "action": 64,
    "actor": 150,
    "agent": 63,
    "backend": 63,
    "token_id": 36,
    "token_prefix": 32,
    "message": 500,
    "method": 16,
    "path": 300,
    "model": 100,
    "outcome": 32,
    "request_id": 100,
    "stop_reason": 32,
    "policy_result": 16,
    "policy_reason": 300,
}
_COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
_FLAGS = ("system_prompt", "streamed")
_MILLISECONDS = ("ttfb_ms", "duration_ms")
INT32_MAX = 2**31 - 1

# Every column a row holds, in the order exports and the feed show them.
EVENT_FIELDS = (
    "id", "created_at", "action", "actor_type", "actor", "agent", "agent_id", "backend",
    "token_id", "token_prefix", "client_address", "message", "method", "path", "model",
    "system_prompt", "streamed", "status", "outcome", "request_id", "input_tokens", "output_tokens",
    "cache_read_tokens", "cache_write_tokens", "stop_reason", "ttfb_ms", "duration_ms",
    "cost_usd", "policy_result", "policy_reason", "detail",
)  # fmt: skip


def event_row(
    *,
    created_at: datetime,
    action: str,
    actor_type: str,
    actor: str,
    agent: str,
    backend: str,
    address: str | None,
    agent_id: str | None = None,
    message: str,
    fields: dict[str, Any],
    columns: frozenset[str],
) -> dict[str, Any]:
    """The column values of one event, as plain data (queueable, spillable, publishable)."""
    row: dict[str, Any] = {
        "created_at": created_at,
        "action": action,
        "actor_type": actor_type,
        "actor": actor,
        "agent": agent,
        # A string: queued rows are plain data; the column takes it as a UUID.
        "agent_id": agent_id or None,
        "backend": backend,
        "client_address": address or None,
        # Messages may quote an upstream; keep credentials out whatever it says.
        "message": redact(message),
    }
    detail: dict[str, Any] = {}
    for name, value in fields.items():
        if name in columns:
            row[COLUMN_OF[name]] = value
        else:
            detail[name] = value
    row["detail"] = _json_ready(detail)
    return _clean(row)


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _json_ready(detail: dict[str, Any]) -> dict[str, Any]:
    """``detail`` as JSON holds it. A value JSON cannot hold (a datetime, a Decimal) would
    fail the write of a whole batch; the round trip is skipped when every value is plain,
    as a proxied call's are (it was a tenth of the call's audit cost)."""
    if all(type(value) in _PLAIN for value in detail.values()):
        return detail
    converted: dict[str, Any] = json.loads(json.dumps(detail, default=str))
    return converted


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    for name, limit in _TEXT_LIMITS.items():
        value = row.get(name)
        if value is None:
            continue
        row[name] = str(value)[:limit]
    if "policy_reason" in row:
        row["policy_reason"] = redact(row["policy_reason"])
    for name in _COUNTS:
        row[name] = _count(row.get(name))
    for name in _FLAGS:
        value = row.get(name)
        row[name] = bool(value) if value is not None else None
    for name in _MILLISECONDS:
        value = row.get(name)
        row[name] = float(value) if isinstance(value, int | float) else None
    status = row.get("status")
    row["status"] = status if isinstance(status, int) and 0 < status < 1000 else None
    cost = row.get("cost_usd")
    # A string: queued rows are plain data (spilled and published as JSON).
    row["cost_usd"] = str(cost) if isinstance(cost, Decimal) and cost.is_finite() else None
    return row


def _count(value: Any) -> int | None:
    # An upstream's numbers are not trusted to fit the column (negative, huge, a string).
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return max(0, min(value, INT32_MAX))


def event_json(event: AuditEvent | dict[str, Any]) -> dict[str, Any]:
    """An event as JSON-ready data: what the feed publishes and the exports write."""
    if isinstance(event, AuditEvent):
        data = {name: getattr(event, name) for name in EVENT_FIELDS}
    else:
        data = {name: event.get(name) for name in EVENT_FIELDS}
        data["detail"] = data["detail"] or {}
    created_at = data["created_at"]
    if isinstance(created_at, datetime):
        data["created_at"] = created_at.isoformat()
    if isinstance(data["cost_usd"], Decimal):
        data["cost_usd"] = str(data["cost_usd"])
    if data["agent_id"] is not None:
        data["agent_id"] = str(data["agent_id"])
    return data
