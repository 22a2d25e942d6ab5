"""Admin page for agents' OIDC client credentials: read-only, never a secret."""

from __future__ import annotations

from django.contrib import admin

from broker.admin.history import HistoryAdmin
from broker.models import OidcClient

OIDC_CLIENT_FIELDS = ("client_id", "agent", "created_at", "last_used_at", "revoked_at")


@admin.register(OidcClient)
class OidcClientAdmin(HistoryAdmin[OidcClient]):
    """Read-only: agents create their client credentials with POST /v1/clients."""

    list_display = ["client_id", "agent", "created_at", "last_used_at", "revoked_at"]
    list_select_related = ["agent"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["client_id", "agent__name"]
    fields = readonly_fields = OIDC_CLIENT_FIELDS
