from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from audit.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin[AuditEvent]):
    """Append-only: nobody edits or deletes history from the admin."""

    list_display = ["created_at", "action", "actor_type", "actor", "backend", "message"]
    list_filter = ["action", "actor_type", "backend"]
    search_fields = ["actor", "backend", "message"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in AuditEvent._meta.get_fields()]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False
