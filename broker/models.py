from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from broker.fields import EncryptedTextField

NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
name_validator = RegexValidator(
    NAME_PATTERN,
    "use 1-63 lowercase letters, digits and dashes, starting and ending with a letter or digit",
)


class ValidationState(models.TextChoices):
    UNKNOWN = "unknown"
    VALID = "valid"
    INVALID = "invalid"
    UNREACHABLE = "unreachable"


class Backend(models.Model):
    """A named upstream credential. The secret is write-only: nothing ever renders it."""

    name = models.CharField(max_length=63, unique=True, validators=[name_validator])
    kind = models.CharField(max_length=32, default="anthropic")
    base_url = models.URLField(max_length=300)
    secret = EncryptedTextField(blank=True, editable=False)
    secret_fingerprint = models.CharField(max_length=64, blank=True)
    auth_scheme = models.CharField(max_length=16, blank=True)
    token_ttl_min = models.PositiveIntegerField(default=60, help_text="seconds")
    token_ttl_max = models.PositiveIntegerField(default=3600, help_text="seconds")
    token_ttl_default = models.PositiveIntegerField(default=600, help_text="seconds")
    enabled = models.BooleanField(default=True)
    validation_state = models.CharField(
        max_length=16, choices=ValidationState.choices, default=ValidationState.UNKNOWN
    )
    validation_checked_at = models.DateTimeField(null=True, blank=True)
    validation_message = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        # Never let a debugger, a log line or an error page print the secret.
        return f"<Backend {self.name} {self.secret_fingerprint}>"


class AdminToken(models.Model):
    """An API token for /v1/admin/ (``cka_…``), acting as its user; stored as a digest."""

    name = models.CharField(max_length=100)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    digest = models.CharField(max_length=64, unique=True)
    display_prefix = models.CharField(max_length=16)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.display_prefix}…)"
