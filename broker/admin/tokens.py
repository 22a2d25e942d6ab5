"""Admin pages for ``crd_`` tokens: a read-only history; revoking is the one action."""

from __future__ import annotations

from typing import Any, cast

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from broker.admin.history import HistoryAdmin
from broker.admin.widgets import acted_on, back, cut, may, post_only, token_badge
from broker.models import Token, TokenQuerySet, TokenState
from broker.services.tokens import token_revoke, tokens_revoke

# Every field shown is read-only, and none holds a digest: those never reach a page.
TOKEN_FIELDS = (
    "id", "agent", "backend", "display_prefix", "state", "ttl_seconds", "created_at",
    "expires_at", "expired_at", "revoked_at", "last_used_at",
)  # fmt: skip


class TokenStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(state.value, state.label.lower()) for state in TokenState]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        wanted = self.value()
        if wanted not in TokenState.values:
            return queryset
        # The changelist's queryset comes from Token's manager, so it has the state filters.
        return cast(TokenQuerySet, queryset).in_state(wanted)


@admin.register(Token)
class TokenAdmin(HistoryAdmin[Token]):
    """Read-only history of ``crd_`` tokens; revoking is the one thing done here."""

    list_display = [
        "display_prefix", "agent_link", "backend", "state", "created_at", "expires_at",
        "last_used_at",
    ]  # fmt: skip
    list_select_related = ["agent", "backend"]
    list_filter = ["backend", TokenStateFilter]
    search_fields = ["display_prefix", "agent__name", "backend__name"]
    actions = ["revoke_selected"]
    fields = readonly_fields = TOKEN_FIELDS

    # Tokens are minted by agents only, and rows stay so the history does (HistoryAdmin).

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return may(request, "change", Token)

    @admin.display(description="agent", ordering="agent__name")
    def agent_link(self, token: Token) -> SafeString:
        url = reverse("admin:broker_agent_change", args=[token.agent_id])
        return format_html('<a href="{}">{}</a>', url, cut(token.agent.name, width_em=12))

    @admin.display(description="state")
    def state(self, token: Token) -> SafeString:
        return token_badge(token)

    @admin.action(description="Revoke selected tokens", permissions=["revoke"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[Token]) -> None:
        live = [token for token in queryset if token.revoked_at is None]
        tokens_revoke(tokens=live, by=request.user)
        skipped = queryset.count() - len(live)
        text = f"revoked {len(live)} token{'s' if len(live) != 1 else ''}"
        if skipped:
            text += f"; {skipped} already revoked"
        self.message_user(request, text, messages.SUCCESS)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/revoke/",
                post_only(self.admin_site, self.revoke_view),
                name="broker_token_revoke",
            ),
            *super().get_urls(),
        ]

    def revoke_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        token = acted_on(self, request, object_id, allowed=self.has_revoke_permission(request))
        already = token.revoked_at is not None
        token_revoke(token=token, by=request.user)
        text = f"token {token.display_prefix}… " + ("was already revoked" if already else "revoked")
        self.message_user(request, text, messages.INFO if already else messages.SUCCESS)
        return back(request, reverse("admin:broker_token_changelist"))

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        token = self.get_object(request, unquote(object_id))
        if token is not None:
            extra_context = {
                "kb_revocable": token.is_live() and self.has_revoke_permission(request),
                **(extra_context or {}),
            }
        return super().change_view(request, object_id, form_url, extra_context)
