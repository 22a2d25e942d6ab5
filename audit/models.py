from __future__ import annotations

from django.db import models


class ActorType(models.TextChoices):
    ADMIN = "admin"
    AGENT = "agent"
    SYSTEM = "system"


class AuditEvent(models.Model):
    """One thing that happened. Append-only; never holds content or a secret."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    action = models.CharField(max_length=64, db_index=True)
    actor_type = models.CharField(max_length=16, choices=ActorType.choices)
    actor = models.CharField(max_length=150, blank=True)
    agent = models.CharField(max_length=63, blank=True, db_index=True)
    backend = models.CharField(max_length=63, blank=True, db_index=True)
    client_address = models.GenericIPAddressField(null=True, blank=True)
    message = models.CharField(max_length=500, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.action}"
