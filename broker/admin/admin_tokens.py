"""Admin API tokens: listed and revoked here, created only with ``manage.py admintoken``."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.db.models import QuerySet
from django.http import HttpRequest

from broker.admin.history import HistoryAdmin
from broker.models import AdminToken
from broker.services.admin_tokens import admintoken_revoke


@admin.register(AdminToken)
class AdminTokenAdmin(HistoryAdmin[AdminToken]):
    """Read-only: tokens are created with `manage.py admintoken create` (shown once) and
    revoked, never deleted, so the trail of who held API access stays."""

    list_display = ["name", "display_prefix", "user", "created_at", "last_used_at", "revoked_at"]
    list_select_related = ["user"]
    readonly_fields = ["name", "display_prefix", "user", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke_selected"]

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        codename = get_permission_codename("change", self.opts)
        return request.user.has_perm(f"{self.opts.app_label}.{codename}")

    @admin.action(description="Revoke selected admin tokens", permissions=["revoke"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[AdminToken]) -> None:
        live = [token for token in queryset if token.revoked_at is None]
        for token in live:
            admintoken_revoke(token_id=token.pk, by=request.user)
        text = f"revoked {len(live)} admin token{'s' if len(live) != 1 else ''}"
        if skipped := len(queryset) - len(live):
            text += f"; {skipped} already revoked"
        self.message_user(request, text, messages.SUCCESS)
