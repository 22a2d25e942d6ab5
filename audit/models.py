from __future__ import annotations

import uuid
from typing import Any, ClassVar

from django.db import models
from django.utils import timezone

from broker.infra.fields import EncryptedTextField


class ActorType(models.TextChoices):
    ADMIN = "admin"
    AGENT = "agent"
    SYSTEM = "system"


class PolicyResult(models.TextChoices):
    ALLOWED = "allowed"
    DENIED = "denied"


class AppendOnly(Exception):
    """History is never edited or deleted; only the retention task removes old rows."""


class AuditEventQuerySet(models.QuerySet["AuditEvent"]):
    """Refuses bulk edits and deletes, so no code path can rewrite history by accident."""

    def update(self, **kwargs: Any) -> int:
        raise AppendOnly("audit events are append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnly("audit events are append-only; old rows go by retention only")

    def prune(self) -> int:
        """Delete the rows of this queryset: the retention service's door, and the only one."""
        deleted, _ = models.QuerySet.delete(self)
        return deleted


class AuditEvent(models.Model):
    """One thing that happened. Append-only; never holds content or a secret.

    Everything an admin filters or sums on is a column: who, what, and for a proxied call
    the request's shape and the upstream's answer (never its text). ``detail`` keeps the
    rest, which differs per action (scopes granted, fingerprints, TTLs).
    """

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    action = models.CharField(max_length=64)
    actor_type = models.CharField(max_length=16, choices=ActorType.choices)
    actor = models.CharField(max_length=150, blank=True)
    agent = models.CharField(max_length=63, blank=True)
    # The agent's id (issue 20, item 9): its name may be taken again after an unenroll, so
    # usage and "this agent's calls" key on the id; null for old rows and non-agent events.
    agent_id = models.UUIDField(null=True, blank=True)
    backend = models.CharField(max_length=63, blank=True)
    token_id = models.CharField(max_length=36, blank=True, db_index=True)
    token_prefix = models.CharField(max_length=32, blank=True)
    client_address = models.GenericIPAddressField(null=True, blank=True)
    message = models.CharField(max_length=500, blank=True)
    # A proxied call: what was asked (never the content) ...
    method = models.CharField(max_length=16, blank=True)
    path = models.CharField(max_length=300, blank=True)
    model = models.CharField(max_length=100, blank=True)
    system_prompt = models.BooleanField(null=True, blank=True)
    streamed = models.BooleanField(null=True, blank=True)
    # ... and what came back.
    status = models.PositiveSmallIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=32, blank=True)
    request_id = models.CharField(max_length=100, blank=True)
    input_tokens = models.PositiveIntegerField(null=True, blank=True)
    output_tokens = models.PositiveIntegerField(null=True, blank=True)
    cache_read_tokens = models.PositiveIntegerField(null=True, blank=True)
    cache_write_tokens = models.PositiveIntegerField(null=True, blank=True)
    stop_reason = models.CharField(max_length=32, blank=True)
    ttfb_ms = models.FloatField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    # USD, from the price tables (broker/prices); null when unknown or nothing was metered.
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)
    policy_result = models.CharField(max_length=16, blank=True, choices=PolicyResult.choices)
    policy_reason = models.CharField(max_length=300, blank=True)
    detail = models.JSONField(default=dict, blank=True)
    # The hash chain (audit/chain.py): this event's place in write order, and SHA-256 of the
    # previous event's hash and this event's fields. Set once, by the chain writer only.
    chain_seq = models.BigIntegerField(null=True, blank=True, unique=True)
    chain_hash = models.CharField(max_length=64, blank=True)

    objects: ClassVar[AuditEventQuerySet] = AuditEventQuerySet.as_manager()  # type: ignore[assignment]

    class Meta:
        ordering = ["-created_at", "-id"]
        # The list, the API and the feed filter on one of these and read newest first.
        indexes = [
            models.Index(fields=["action", "-created_at"], name="audit_action_time"),
            models.Index(fields=["agent", "-created_at"], name="audit_agent_time"),
            models.Index(fields=["agent_id", "-created_at"], name="audit_agent_id_time"),
            models.Index(fields=["backend", "-created_at"], name="audit_backend_time"),
            models.Index(fields=["status", "-created_at"], name="audit_status_time"),
            models.Index(fields=["model", "-created_at"], name="audit_model_time"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.action}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnly("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AppendOnly("audit events are append-only; old rows go by retention only")


class UsageRollup(models.Model):
    """Proxied calls summed per UTC hour, agent, backend and model (docs/decisions.md,
    "Usage and rollups"). Written only by ``usage_rollup`` (audit/rollups.py), which adds
    each audit row exactly once; the usage API, page and commands read these, never the
    trail.
    """

    hour = models.DateTimeField(help_text="start of the UTC hour")
    # The agent's id as text, "" for calls no agent was known for (a bad token): a unique
    # constraint treats NULLs as distinct, so "no agent" needs a value of its own.
    agent_key = models.CharField(max_length=36, blank=True)
    # The agent's name as the latest counted call recorded it; the current name is read
    # from the Agent row when there is one.
    agent_name = models.CharField(max_length=63, blank=True)
    backend = models.CharField(max_length=63, blank=True)
    model = models.CharField(max_length=100, blank=True)
    calls = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0)
    refusals = models.PositiveBigIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    cache_read_tokens = models.PositiveBigIntegerField(default=0)
    cache_write_tokens = models.PositiveBigIntegerField(default=0)
    # The sum of the calls whose cost is known; ``cost_unknown`` counts the others.
    cost_usd = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    cost_unknown = models.PositiveBigIntegerField(default=0)
    # Calls per time-to-first-byte bucket (audit/rollups.py, TTFB_BOUNDS_MS).
    ttfb_histogram = models.JSONField(default=list)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "agent_key", "backend", "model"], name="usage_rollup_once"
            )
        ]
        indexes = [models.Index(fields=["agent_key", "hour"], name="usage_agent_hour")]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.agent_name or '-'} {self.backend} {self.model}"


class UsageCursor(models.Model):
    """How far the rollups have read the trail: one row, claimed by a conditional update.

    ``last_id`` is the highest audit row id counted; ``gaps`` lists ids below it that were
    not visible yet when it moved (a batch committed after a later one), as
    ``[first, last, seen_at]`` ranges, looked for again until they are too old to come.
    """

    name = models.CharField(max_length=32, unique=True)
    last_id = models.BigIntegerField(default=0)
    gaps = models.JSONField(default=list)
    # Bumped by every claim: two workers that read the same version cannot both count.
    version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.name} at {self.last_id}"


class AuditChain(models.Model):
    """The head of the hash chain: the last event written (one row, ``pk=1``).

    Every writer locks this row in the transaction that writes its events, so events get
    their places in one order across processes; it is one locked row per batch.
    """

    seq = models.BigIntegerField(default=0)
    hash = models.CharField(max_length=64, default="0" * 64)

    def __str__(self) -> str:
        return f"audit chain at #{self.seq}"


class AuditCheckpoint(models.Model):
    """Where retention cut the chain: every event up to ``seq`` was deleted, and ``hash`` was
    the last one's. Verification starts after the latest checkpoint."""

    created_at = models.DateTimeField(default=timezone.now)
    seq = models.BigIntegerField(unique=True)
    hash = models.CharField(max_length=64)
    deleted = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-seq"]

    def __str__(self) -> str:
        return f"audit checkpoint at #{self.seq}"


# --- alerts (issue 17): where events are sent, and what became of each sending ---------------
class ChannelKind(models.TextChoices):
    WEBHOOK = "webhook"
    SLACK = "slack"
    EMAIL = "email"


class AlertEvent(models.TextChoices):
    """What a channel may subscribe to (docs/alerts.md has each payload)."""

    AGENT_WAITING = "agent.waiting"
    SCOPES_REQUESTED = "agent.scopes_requested"
    KEY_INVALID = "backend.key_invalid"
    BUDGET_80 = "budget.80"
    BUDGET_100 = "budget.100"
    SPIKE = "spike"
    AUDIT_SPILLED = "audit.spilled"
    CALL_HELD = "call.held"
    TEST = "test"


class NotificationChannel(models.Model):
    """A place alerts go: a webhook, a Slack incoming webhook or email addresses.

    ``target`` (the URL, or the addresses) is encrypted like a backend's key: a Slack URL
    is itself a credential and a webhook URL often carries one. ``target_display`` is what
    every surface shows instead; ``signing_secret`` (webhooks) is shown once, at creation.
    """

    kind = models.CharField(max_length=16, choices=ChannelKind.choices)
    target = EncryptedTextField()
    target_display = models.CharField(max_length=300)
    signing_secret = EncryptedTextField(blank=True, default="")
    secret_hint = models.CharField(max_length=32, blank=True)
    events = models.JSONField(default=list)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.target_display}"


class DeliveryState(models.TextChoices):
    PENDING = "pending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    FAILED = "failed"


class NotificationDelivery(models.Model):
    """One alert for one channel; its id is the ``X-Keybroker-Delivery`` a receiver dedupes on.

    ``payload`` is the JSON body a webhook receives (event data, never a secret).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    channel = models.ForeignKey(
        NotificationChannel, on_delete=models.CASCADE, related_name="deliveries"
    )
    event = models.CharField(max_length=64)
    payload = models.JSONField(default=dict)
    state = models.CharField(
        max_length=16, choices=DeliveryState.choices, default=DeliveryState.PENDING
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # When the next try is due while pending or retrying: a task that comes early finds
    # another one owns the delivery; the sweep queues again what is long overdue.
    next_try_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "notification deliveries"
        indexes = [models.Index(fields=["state", "next_try_at"], name="delivery_due")]

    def __str__(self) -> str:
        return f"{self.event} → {self.channel_id} ({self.state})"


class DeliveryAttempt(models.Model):
    """One try of a delivery: the receiver's status or the error, and how long it took."""

    delivery = models.ForeignKey(
        NotificationDelivery, on_delete=models.CASCADE, related_name="attempt_log"
    )
    number = models.PositiveSmallIntegerField()
    at = models.DateTimeField(default=timezone.now)
    status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=300, blank=True)
    duration_ms = models.FloatField(default=0)

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="attempt_once"),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number}: {self.status or self.error}"
