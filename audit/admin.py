from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from audit.models import AuditEvent, PolicyResult
from broker.admin.history import HistoryAdmin
from broker.admin.widgets import cut

STATUS_COLOURS = {"2": "#1a7f37", "3": "#6e7781", "4": "#cf222e", "5": "#cf222e"}
DENIED_COLOUR = "#bf8700"


class TextFilter(admin.SimpleListFilter):
    """A text box for an exact value, where listing every value would not scale (agents)."""

    template = "audit/text_filter.html"
    column = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("", "")]  # a filter without lookups is not shown at all

    def choices(self, changelist: Any) -> Any:
        keep = [(k, v) for k, v in changelist.params.items() if k != self.parameter_name]
        yield {
            "parameter": self.parameter_name,
            "value": self.value() or "",
            "keep": keep,
            "clear": changelist.get_query_string(remove=[self.parameter_name]),
        }

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = (self.value() or "").strip()
        return queryset.filter(**{self.column: value}) if value else queryset


class AgentFilter(TextFilter):
    title = "agent"
    parameter_name = column = "agent"


class StatusFilter(admin.SimpleListFilter):
    """Proxied calls by how they went; admin events have no status."""

    title = "status"
    parameter_name = "status_class"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("2xx", "2xx success"),
            ("4xx", "4xx client error"),
            ("5xx", "5xx server error"),
            ("denied", "refused by keybroker"),
            ("none", "no status (not a proxied call)"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "denied":
            return queryset.filter(policy_result=PolicyResult.DENIED)
        if value == "none":
            return queryset.filter(status__isnull=True)
        if value in {"2xx", "4xx", "5xx"}:
            low = int(value[0]) * 100
            return queryset.filter(status__gte=low, status__lt=low + 100)
        return queryset


class ProxiedFilter(admin.SimpleListFilter):
    title = "kind"
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("proxied", "proxied calls"), ("other", "everything else")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        proxied = Q(action__in=["proxy.request", "policy.denied"])
        if self.value() == "proxied":
            return queryset.filter(proxied)
        if self.value() == "other":
            return queryset.exclude(proxied)
        return queryset


@admin.register(AuditEvent)
class AuditEventAdmin(HistoryAdmin[AuditEvent]):
    """Read-only: nobody adds, edits or deletes history from the admin."""

    list_display = [
        "created_at", "action", "who", "agent_cut", "backend", "model_cut", "status_badge",
        "tokens", "cost", "latency", "message_cut",
    ]  # fmt: skip
    list_filter = [
        ProxiedFilter, "action", AgentFilter, "backend", StatusFilter, "outcome", "model",
        "actor_type", "created_at",
    ]  # fmt: skip
    # Exact matches for ids, so a pasted request-id or token id uses its index.
    search_fields = [
        "=request_id", "=token_id", "=token_prefix", "agent", "backend", "actor", "model",
        "path", "message",
    ]  # fmt: skip
    search_help_text = "agent, backend, actor, model, path or message; exact request or token id"
    date_hierarchy = "created_at"
    list_per_page = 100
    show_full_result_count = False  # COUNT(*) over a large trail on every page is slow
    fieldsets = [
        (None, {"fields": ["created_at", "action", "actor_type", "actor", "agent", "agent_id",
                           "backend", "client_address", "message"]}),
        ("Token", {"fields": ["token_id", "token_prefix"]}),
        ("Proxied call", {"fields": [
            "method", "path", "model", "system_prompt", "streamed", "status", "outcome",
            "request_id", "input_tokens", "output_tokens", "cache_read_tokens",
            "cache_write_tokens", "cost_usd", "stop_reason", "ttfb_ms", "duration_ms",
            "policy_result", "policy_reason",
        ]}),
        ("Detail", {"fields": ["detail_json"]}),
        ("Hash chain", {"fields": ["chain_seq", "chain_hash"]}),
    ]  # fmt: skip

    def get_readonly_fields(self, request: HttpRequest, obj: AuditEvent | None = None) -> Any:
        return [
            name for fieldset in self.fieldsets for name in fieldset[1]["fields"]
        ]  # fmt: skip

    @admin.display(description="actor")
    def who(self, event: AuditEvent) -> SafeString | str:
        # An agent acting for itself is named once, in the agent column.
        if not event.actor or (event.actor_type == "agent" and event.actor == event.agent):
            return event.actor_type
        return cut(f"{event.actor_type}: {event.actor}", width_em=12)

    @admin.display(description="agent", ordering="agent")
    def agent_cut(self, event: AuditEvent) -> SafeString:
        return cut(event.agent, width_em=12)

    @admin.display(description="model", ordering="model")
    def model_cut(self, event: AuditEvent) -> SafeString:
        return cut(event.model, width_em=10)

    @admin.display(description="message")
    def message_cut(self, event: AuditEvent) -> SafeString:
        return cut(event.message, width_em=18)

    @admin.display(description="status", ordering="status")
    def status_badge(self, event: AuditEvent) -> SafeString | str:
        if event.policy_result == PolicyResult.DENIED:
            return format_html(
                '<span class="kb-audit-denied" style="color:{};font-weight:600">{}</span>',
                DENIED_COLOUR,
                event.status or "denied",
            )
        if event.status is None:
            return ""
        colour = STATUS_COLOURS.get(str(event.status)[0], "#6e7781")
        return format_html('<span style="color:{};font-weight:600">{}</span>', colour, event.status)

    @admin.display(description="tokens in / out")
    def tokens(self, event: AuditEvent) -> str:
        if event.input_tokens is None and event.output_tokens is None:
            return ""
        return f"{event.input_tokens or 0} / {event.output_tokens or 0}"

    @admin.display(description="cost (USD)", ordering="cost_usd")
    def cost(self, event: AuditEvent) -> str:
        if event.cost_usd is not None:
            return f"{event.cost_usd:.4f}"
        # Tokens were counted but no price table knows the model: unknown, never 0.
        return "unknown" if event.input_tokens is not None else ""

    @admin.display(description="duration", ordering="duration_ms")
    def latency(self, event: AuditEvent) -> str:
        return f"{event.duration_ms:.0f} ms" if event.duration_ms is not None else ""

    @admin.display(description="detail")
    def detail_json(self, event: AuditEvent) -> SafeString:
        return format_html("<pre>{}</pre>", json.dumps(event.detail, indent=2, sort_keys=True))


# Alerts: channels and the delivery log (issue 17).
from audit import alerts_admin  # noqa: E402, F401
