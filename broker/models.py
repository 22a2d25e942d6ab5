from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from broker.infra.fields import EncryptedTextField
from broker.kinds import DEFAULT_KIND

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
    kind = models.CharField(max_length=32, default=DEFAULT_KIND)
    base_url = models.URLField(max_length=300)
    # The keys themselves are the backend's pool (BackendKey); these two describe its first
    # enabled key (or what a keyless backend uses instead), for lists and the audit trail.
    secret_fingerprint = models.CharField(max_length=64, blank=True)
    auth_scheme = models.CharField(max_length=16, blank=True)
    # Behavry's mode: no stored secret; each agent sends its own key in X-Anthropic-Key and
    # keybroker authenticates, audits and enforces policy around it.
    client_key = models.BooleanField(default=False)
    # Workload identity (kind anthropic-wif): no stored secret at all. keybroker signs a JWT
    # as its own OIDC issuer and exchanges it at the upstream for a short-lived access
    # token. These are identifiers, not secrets: they may be shown anywhere.
    federation_rule_id = models.CharField(max_length=100, blank=True)
    organization_id = models.CharField(max_length=100, blank=True)
    service_account_id = models.CharField(max_length=100, blank=True)
    workspace_id = models.CharField(max_length=100, blank=True)
    federation_audience = models.CharField(
        max_length=255, blank=True, help_text="the aud of keybroker's JWT for this upstream"
    )
    token_ttl_min = models.PositiveIntegerField(default=60, help_text="seconds")
    token_ttl_max = models.PositiveIntegerField(default=3600, help_text="seconds")
    token_ttl_default = models.PositiveIntegerField(default=600, help_text="seconds")
    enabled = models.BooleanField(default=True)
    # Policy defaults for every grant on this backend; a grant's own value wins, and null
    # here means no restriction. The max TTL default is token_ttl_max itself.
    default_models = models.JSONField(null=True, blank=True, help_text="model globs")
    default_paths = models.JSONField(null=True, blank=True, help_text="upstream path globs")
    default_rpm = models.PositiveIntegerField(null=True, blank=True)
    default_tpm = models.PositiveBigIntegerField(null=True, blank=True)
    default_daily_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    default_daily_usd = models.DecimalField(
        max_digits=13, decimal_places=6, null=True, blank=True, help_text="USD per UTC day"
    )
    default_monthly_usd = models.DecimalField(
        max_digits=13, decimal_places=6, null=True, blank=True, help_text="USD per UTC month"
    )
    default_max_tokens = models.PositiveIntegerField(null=True, blank=True)
    default_max_concurrent = models.PositiveIntegerField(null=True, blank=True)
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

    @property
    def federated(self) -> bool:
        """Whether calls go upstream with an access token from a workload identity exchange."""
        return bool(self.federation_rule_id)

    @property
    def secret(self) -> str:
        """The first enabled key of the pool ("" when it stores none): what a caller that
        knows one key per backend sees. The proxy reads the whole pool instead."""
        pending = getattr(self, "_pending_key", None)
        if self.pk is None:
            return pending.secret if pending is not None else ""
        key = self.keys.filter(enabled=True).first()
        return key.secret if key is not None else ""


class BackendKey(models.Model):
    """One upstream key of a backend's pool (issue 15), encrypted at rest. It is named by
    its fingerprint, unique within the backend; the key itself is never rendered."""

    backend = models.ForeignKey(Backend, on_delete=models.CASCADE, related_name="keys")
    position = models.PositiveIntegerField(default=0)
    secret = EncryptedTextField(editable=False)
    fingerprint = models.CharField(max_length=64)
    auth_scheme = models.CharField(max_length=16)
    weight = models.PositiveIntegerField(default=1)
    enabled = models.BooleanField(default=True)
    validation_state = models.CharField(
        max_length=16, choices=ValidationState.choices, default=ValidationState.UNKNOWN
    )
    validation_checked_at = models.DateTimeField(null=True, blank=True)
    validation_message = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["position", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["backend", "fingerprint"], name="backend_key_fingerprint_unique"
            ),
            models.CheckConstraint(condition=models.Q(weight__gte=1), name="backend_key_weight"),
        ]

    def __str__(self) -> str:
        return self.fingerprint

    def __repr__(self) -> str:
        return f"<BackendKey {self.backend_id} {self.fingerprint}>"


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


AGENT_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
agent_name_validator = RegexValidator(
    AGENT_NAME_PATTERN,
    "use 1-63 letters, digits, dots, dashes and underscores, starting and ending with a "
    "letter or digit",
)


class AgentStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    UNENROLLED = "unenrolled"


# Waiting for a decision: a new agent, or an approved one that asked for more backends.
# The rule in SQL; Agent.is_waiting is the same rule in Python, next to it on purpose.
_WAITING = models.Q(status=AgentStatus.PENDING) | (
    models.Q(status=AgentStatus.APPROVED) & ~models.Q(requested_scopes=[])
)


class AgentQuerySet(models.QuerySet["Agent"]):
    def waiting(self) -> AgentQuerySet:
        """Agents an admin must decide on: pending, or approved and asking for more scopes."""
        return self.filter(_WAITING)

    def with_decision_rank(self) -> AgentQuerySet:
        """Annotates ``decision_rank``: 0 pending, 1 approved but asking for more, 2 the rest."""
        return self.annotate(
            decision_rank=models.Case(
                models.When(status=AgentStatus.PENDING, then=models.Value(0)),
                models.When(_WAITING, then=models.Value(1)),
                default=models.Value(2),
                output_field=models.IntegerField(),
            )
        )


class Agent(models.Model):
    """A program that asked for credentials. Its scopes are backend names.

    ``requested_scopes`` holds what it asked for and no admin has granted yet; the granted
    scopes are its Grants. Rows are never deleted by the agent itself, so history stays.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=63, validators=[agent_name_validator])
    description = models.CharField(max_length=500, blank=True)
    status = models.CharField(
        max_length=16, choices=AgentStatus.choices, default=AgentStatus.PENDING, db_index=True
    )
    requested_scopes = models.JSONField(default=list, blank=True)
    vend_digest = models.CharField(max_length=64, unique=True, editable=False)
    vend_prefix = models.CharField(max_length=16, editable=False)
    enrolled_from = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    last_seen_at = models.DateTimeField(null=True, blank=True)
    unenrolled_at = models.DateTimeField(null=True, blank=True)

    objects = AgentQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            # An unenrolled agent keeps its row for history but frees its name.
            models.UniqueConstraint(
                fields=["name"],
                condition=~models.Q(status="unenrolled"),
                name="agent_name_unique_while_enrolled",
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_approved(self) -> bool:
        return self.status == AgentStatus.APPROVED

    @property
    def is_waiting(self) -> bool:
        """The same rule as ``Agent.objects.waiting()``."""
        return self.status == AgentStatus.PENDING or (
            self.status == AgentStatus.APPROVED and bool(self.requested_scopes)
        )


class Grant(models.Model):
    """Agent and backend: the agent may mint tokens for this backend, within its policy.

    Each policy field left null takes the backend's default (``default_*``); see
    broker/services/policy.py. Changed only through ``grant_update`` so every proxy process
    hears of it at once.
    """

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="grants")
    backend = models.ForeignKey(Backend, on_delete=models.CASCADE, related_name="grants")
    allowed_models = models.JSONField(null=True, blank=True, help_text="model globs")
    allowed_paths = models.JSONField(null=True, blank=True, help_text="upstream path globs")
    rpm = models.PositiveIntegerField(null=True, blank=True, help_text="requests per minute")
    tpm = models.PositiveBigIntegerField(null=True, blank=True, help_text="tokens per minute")
    daily_tokens = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="tokens per UTC day"
    )
    # To the millionth of a dollar, as a call's cost is counted (broker/prices).
    daily_usd = models.DecimalField(
        max_digits=13, decimal_places=6, null=True, blank=True, help_text="USD per UTC day"
    )
    monthly_usd = models.DecimalField(
        max_digits=13, decimal_places=6, null=True, blank=True, help_text="USD per UTC month"
    )
    max_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="cap on a request's max_tokens"
    )
    max_concurrent = models.PositiveIntegerField(
        null=True, blank=True, help_text="calls in flight at once, per proxy process"
    )
    max_ttl = models.PositiveIntegerField(
        null=True, blank=True, help_text="seconds; lowers the backend's token TTL bound"
    )
    # Which calls wait for a person's approval (broker/services/policy.py, HoldRule).
    hold = models.JSONField(null=True, blank=True, help_text="calls held for approval")
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    class Meta:
        ordering = ["agent__name", "backend__name"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "backend"], name="grant_once_per_backend")
        ]

    def __str__(self) -> str:
        return f"{self.agent} → {self.backend}"


class IdentityGrant(models.Model):
    """An agent may get identity tokens (JWTs signed by keybroker) for this audience.

    Without one, ``/oauth/token`` only mints JWTs whose audience is keybroker itself; with
    one, a relying party such as Anthropic's workload identity federation can accept them.
    """

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="identity_grants")
    audience = models.CharField(max_length=255)
    lifetime = models.PositiveIntegerField(
        default=600, help_text="seconds each identity token for this audience lives"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    class Meta:
        ordering = ["agent__name", "audience"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "audience"], name="identity_once_per_audience")
        ]

    def __str__(self) -> str:
        return f"{self.agent} → {self.audience}"


class TokenState(models.TextChoices):
    """Derived, never stored: from ``revoked_at`` and ``expires_at`` against the clock."""

    LIVE = "live"
    EXPIRED = "expired"
    REVOKED = "revoked"


def token_state_at(*, revoked: bool, expires_at: datetime, now: datetime) -> TokenState:
    """The one liveness rule. Revoked wins over expired; a token dies at ``expires_at``.

    Kept apart from Token so the proxy, which holds a cached snapshot rather than a row,
    applies exactly the rule that ``TokenQuerySet`` applies in SQL.
    """
    if revoked:
        return TokenState.REVOKED
    return TokenState.LIVE if expires_at > now else TokenState.EXPIRED


class TokenQuerySet(models.QuerySet["Token"]):
    def live(self, now: datetime | None = None) -> TokenQuerySet:
        return self.filter(revoked_at__isnull=True, expires_at__gt=now or timezone.now())

    def expired(self, now: datetime | None = None) -> TokenQuerySet:
        """Past their expiry and never revoked (a revoked token counts as revoked)."""
        return self.filter(revoked_at__isnull=True, expires_at__lte=now or timezone.now())

    def revoked(self) -> TokenQuerySet:
        return self.filter(revoked_at__isnull=False)

    def in_state(self, state: str, now: datetime | None = None) -> TokenQuerySet:
        """``live``, ``expired`` or ``revoked``; ValueError for anything else."""
        if state == TokenState.LIVE:
            return self.live(now)
        if state == TokenState.EXPIRED:
            return self.expired(now)
        if state == TokenState.REVOKED:
            return self.revoked()
        raise ValueError(f"no token state {state!r}")


class Token(models.Model):
    """A ``crd_…`` access token for one agent and one backend; stored as a digest."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="tokens")
    backend = models.ForeignKey(Backend, on_delete=models.CASCADE, related_name="tokens")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    display_prefix = models.CharField(max_length=16, editable=False)
    ttl_seconds = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Set by the sweep once it has recorded the expiry; expiry itself is checked on use.
    expired_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = TokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["agent", "revoked_at", "expires_at"])]

    def __str__(self) -> str:
        return f"{self.display_prefix}…"

    def state(self, now: datetime | None = None) -> TokenState:
        return token_state_at(
            revoked=self.revoked_at is not None,
            expires_at=self.expires_at,
            now=now or timezone.now(),
        )

    def is_live(self, now: datetime | None = None) -> bool:
        return self.state(now) == TokenState.LIVE


class OidcClient(models.Model):
    """OAuth client credentials of an agent: ``client_id`` and a ``cks_…`` secret digest."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="oidc_clients")
    client_id = models.CharField(max_length=64, unique=True)
    secret_digest = models.CharField(max_length=64, unique=True, editable=False)
    secret_prefix = models.CharField(max_length=16, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "OIDC client"  # not Django's "Oidc client"

    def __str__(self) -> str:
        return self.client_id


class SigningKey(models.Model):
    """A JWT signing key of keybroker's OIDC issuer.

    Kept in the database, not a file, so every web process on every machine signs and
    publishes the same keys; the private half is encrypted like an upstream secret.
    """

    kid = models.CharField(max_length=64, unique=True)
    algorithm = models.CharField(max_length=8, default="ES256")
    private_pem = EncryptedTextField(editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    # A retired key signs nothing new but stays published until its last JWT has expired.
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.kid

    def __repr__(self) -> str:
        return f"<SigningKey {self.kid}>"


class AccessGeneration(models.Model):
    """One row: a value every change to who may call what sets anew, in the change's own
    transaction (broker/services/access.py, access_changed).

    The same news goes over Redis at once; this copy is what proxy processes read each
    second in case that news was lost (the announcing process could not reach Redis).
    """

    value = models.CharField(max_length=32)

    def __str__(self) -> str:
        return self.value


# How often a "last used" or "last seen" time is written at most: often enough to answer
# "is this still in use?", rare enough that a busy credential does not write on every call.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def last_used_stale(last: datetime | None, now: datetime) -> bool:
    """Whether a "last used" time read as ``last`` is due to be written again at ``now``."""
    return last is None or last <= now - LAST_USED_RESOLUTION


def touch_last_used(
    model: type[models.Model], pk: Any, *, now: datetime | None = None, field: str = "last_used_at"
) -> datetime | None:
    """Set ``field`` of one row to now, unless it was set within ``LAST_USED_RESOLUTION``.

    One conditional UPDATE (``last_used_stale`` in SQL), so processes racing on the same
    row write once between them. Returns the time written, or None when it was fresh.
    """
    now = now or timezone.now()
    stale = models.Q(**{f"{field}__isnull": True}) | models.Q(
        **{f"{field}__lte": now - LAST_USED_RESOLUTION}
    )
    written = model._default_manager.filter(stale, pk=pk).update(**{field: now})
    return now if written else None


def touch_last_used_row(
    row: models.Model, *, now: datetime | None = None, field: str = "last_used_at"
) -> None:
    """``touch_last_used`` for a row just read: no query at all while the row is fresh."""
    now = now or timezone.now()
    if last_used_stale(getattr(row, field), now) and touch_last_used(
        type(row), row.pk, now=now, field=field
    ):
        setattr(row, field, now)
