"""The audit record of a proxied call: what the proxy learns of it as it goes, and the one
event it becomes (docs/decisions.md, "One event per proxied call"). Metadata only: never a
body, never a secret."""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from audit.recorder import audit_enqueue
from broker.prices import call_cost
from proxy.access import AccessDenied, TokenAccess
from proxy.errors import BadRequest, ProxyError
from proxy.metering import UsageMeter
from proxy.policy import PolicyDenied, Ticket
from proxy.providers import ANTHROPIC, Wire


@dataclass
class Exchange:
    """One proxied call, as the audit trail will see it."""

    method: str
    path: str
    address: str | None
    started: float
    access: TokenAccess | None = None
    backend: str = ""
    status: int = 0
    ttfb_ms: float | None = None
    request_id: str = ""
    outcome: str = "ok"
    body_complete: bool = False
    facts: dict[str, Any] | None = None
    meter: UsageMeter | None = None
    error: ProxyError | None = None  # what keybroker answered in the upstream's place
    ticket: Ticket | None = None  # where a metered grant's usage is counted
    cost_usd: Decimal | None = None  # set by record(); None while unknown
    token_digest: str = ""  # of the crd_ token, to close the call if it is revoked
    note: str = ""  # why the call ended as it did, when it was cut short
    at_frame_end: bool = True  # whether what was sent so far ends between SSE events
    body_held: int = 0  # request-body bytes held in memory, against the process' budget
    body_refused: BadRequest | None = None  # why a streamed request body was cut off
    batch_created: str = ""  # the id of the message batch this call created
    batch_results: str = ""  # the id of the message batch whose results this call read
    upstream_seconds: float = 0.0  # spent waiting on the upstream, left out of Server-Timing
    key_fingerprint: str = ""  # the pool's key that served (or was last tried)
    retried: bool = False  # sent again with another key (proxy/forwarding.py, _failover)
    # The first attempt of a retried call: its key, and the upstream's status or, when the
    # upstream was not reached, why ("unreachable (ClientConnectorError)", "connect timeout").
    failed_key_fingerprint: str = ""
    failed_status: int | None = None
    failed_error: str = ""
    # The backend's provider's wire once its route is known (``wire_known``); until then
    # Anthropic's, which a refusal before the route was read may still correct.
    wire: Wire = ANTHROPIC
    wire_known: bool = False
    # A call held for a person's approval (proxy/hold.py): its hold, how long it waited
    # (left out of Server-Timing's keybroker time, and shown as its own metric) and how
    # the hold ended.
    hold_id: str = ""
    held_seconds: float = 0.0
    hold_decision: str = ""

    def server_timing(self) -> tuple[bytes, bytes]:
        """keybroker's own time so far, upstream excluded (docs/decisions.md, Server-Timing)."""
        own = time.perf_counter() - self.started - self.upstream_seconds - self.held_seconds
        timing = f"keybroker;dur={max(0.0, own) * 1000:.3f}"
        if self.hold_id:
            timing += f", held;dur={self.held_seconds * 1000:.3f}"
        return b"server-timing", timing.encode()

    def answered_by(self, error: ProxyError) -> None:
        """keybroker answered in the upstream's place; the error says how to audit it."""
        self.status, self.error = error.status, error
        if isinstance(error, AccessDenied) and self.access is None:
            self.access = error.access  # refused after its token was read: name the agent

    def record(self, message: str = "") -> None:
        usage = self.meter.finish() if self.meter is not None else None
        facts = self.facts or {}
        error = self.error
        outcome = error.outcome if error is not None else self.outcome
        action = error.action if error is not None else "proxy.request"
        denied = error is not None and error.denied
        fields: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "outcome": outcome,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 2),
            "ttfb_ms": self.ttfb_ms,
            "request_id": self.request_id,
            "model": (usage.model if usage and usage.model else facts.get("model", "")),
            "system_prompt": facts.get("system"),
            "streamed": facts.get("stream"),
            "policy_result": "denied" if denied else ("allowed" if self.access else ""),
            "policy_reason": message if denied else "",
        }
        if usage is not None:
            fields["input_tokens"] = usage.tokens.get("input_tokens")
            fields["output_tokens"] = usage.tokens.get("output_tokens")
            fields["cache_read_tokens"] = usage.tokens.get("cache_read_input_tokens")
            fields["cache_write_tokens"] = usage.tokens.get("cache_creation_input_tokens")
            fields["stop_reason"] = usage.stop_reason
            if not usage.unmetered:
                # Computed once: the audit shows it and the USD budgets count it.
                self.cost_usd = fields["cost_usd"] = call_cost(
                    fields["model"], usage.tokens, batch=bool(self.batch_results)
                )
            if usage.error_type:
                fields["error_type"] = usage.error_type  # not a column: kept in detail
            if usage.unmetered:
                fields["unmetered"] = usage.unmetered  # why the tokens are missing or partial
            if self.batch_results:
                fields["batch_id"] = self.batch_results
                fields["batch_requests"] = usage.requests
        if self.batch_created:
            fields["batch_id"] = self.batch_created
        if "batch_requests" in facts:
            fields["batch_requests"] = facts["batch_requests"]
        if isinstance(error, PolicyDenied):
            fields["policy_rule"] = error.rule
        if self.key_fingerprint:
            fields["key_fingerprint"] = self.key_fingerprint  # which key served (issue 15)
        if self.retried:
            fields["retried"] = True
            fields["failed_key_fingerprint"] = self.failed_key_fingerprint
            if self.failed_status is not None:
                fields["failed_status"] = self.failed_status
            if self.failed_error:
                fields["failed_error"] = self.failed_error
        if self.hold_id:
            fields["hold_id"] = self.hold_id
            fields["held_ms"] = round(self.held_seconds * 1000, 2)
            fields["hold_decision"] = self.hold_decision
        if self.access is not None:
            fields["token_id"] = self.access.token_id
            fields["token"] = self.access.token_prefix
        audit_enqueue(
            action=action,
            agent=self.access.agent_name if self.access else "",
            agent_id=self.access.agent_id if self.access else None,
            backend=self.backend,
            message=message,
            address=self.address,
            **fields,
        )
