"""``crd_…`` access tokens: minted by approved agents, short-lived, revocable at once."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from broker.infra.errors import NotFound, NotPermitted, ServiceError
from broker.infra.secrets import secret_issue
from broker.kinds import provider_for
from broker.models import Agent, Backend, Token
from broker.services.access import access_changed, agent_require_approved
from keybroker import wire
from keybroker.wire import duration_format

logger = logging.getLogger(__name__)

User = AbstractBaseUser | AnonymousUser | None
CRD_PREFIX = "crd"


@dataclass(frozen=True)
class IssuedToken:
    token: Token
    plaintext: str

    @property
    def base_url(self) -> str:
        return sdk_base_url(self.token.backend)


def proxy_base_url(backend_name: str) -> str:
    """Where the proxy serves this backend: the upstream's root, before its own paths."""
    return wire.proxy_base_url(settings.PUBLIC_URL, backend_name)


def sdk_base_url(backend: Backend) -> str:
    """What the backend's provider's SDK takes as its ``base_url`` to call through the
    proxy (OpenAI's SDKs want the ``/v1`` in it, Anthropic's do not)."""
    return proxy_base_url(backend.name) + provider_for(backend.kind).sdk_path


def ttl_parse(value: object) -> int:
    """Seconds from ``90``, ``"90"``, ``"90s"``, ``"30m"`` or ``"1h"``; ServiceError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ServiceError("give seconds or a duration such as 90s, 30m or 1h", "ttl")
    try:
        seconds = int(wire.duration_parse(str(value)))
    except ValueError as exc:
        raise ServiceError(str(exc), "ttl") from None
    if seconds <= 0:
        raise ServiceError("must be longer than zero", "ttl")
    return seconds


def ttl_bounds(*, backend: Backend, max_ttl: int | None = None) -> tuple[int, int, int]:
    """Shortest, default and longest TTL; a grant's ``max_ttl`` only ever lowers them."""
    low, default, high = backend.token_ttl_min, backend.token_ttl_default, backend.token_ttl_max
    if max_ttl is not None and max_ttl < high:
        high = max_ttl
        low, default = min(low, high), min(default, high)
    return low, default, high


def ttl_for(*, backend: Backend, requested: object | None, max_ttl: int | None = None) -> int:
    low, default, high = ttl_bounds(backend=backend, max_ttl=max_ttl)
    if requested is None or requested == "":
        return default
    seconds = ttl_parse(requested)
    if not low <= seconds <= high:
        whose = f"backend {backend.name}"
        if high < backend.token_ttl_max:
            whose = f"this grant on {whose}"
        raise ServiceError(
            f"{duration_format(seconds)} is outside the bounds of {whose}: "
            f"{duration_format(low)} to {duration_format(high)}",
            "ttl",
        )
    return seconds


@transaction.atomic
def token_issue(
    *, agent: Agent, backend_name: str, ttl: object | None = None, address: str | None = None
) -> IssuedToken:
    """Mint a token; only an approved agent with a grant for an enabled backend gets one.

    The agent is read again, locked: the caller's copy may predate an unenrollment or a
    grant's removal that revoked every live token, and a mint after it must not leave one.
    """
    agent = Agent.objects.select_for_update().get(pk=agent.pk)
    agent_require_approved(agent)
    backend = Backend.objects.filter(name=backend_name).first()
    if backend is None:
        # The agent learns the names of the backends it may use, and nothing else.
        granted = sorted(agent.grants.values_list("backend__name", flat=True))
        raise NotFound(
            f"no backend named {backend_name!r}; agent {agent.name} may use "
            + (", ".join(granted) if granted else "none yet")
            + " (`keybroker status` lists them)"
        )
    grant = agent.grants.filter(backend=backend).first()
    if grant is None:
        raise NotPermitted(
            f"agent {agent.name} has no grant for backend {backend.name}; "
            f"ask for it with `keybroker request --can {backend.name}` (POST /v1/request)"
        )
    if not backend.enabled:
        raise NotPermitted(f"backend {backend.name} is disabled")
    seconds = ttl_for(backend=backend, requested=ttl, max_ttl=grant.max_ttl)
    issued = secret_issue(CRD_PREFIX)
    token = Token.objects.create(
        agent=agent,
        backend=backend,
        digest=issued.digest,
        display_prefix=issued.display_prefix,
        ttl_seconds=seconds,
        expires_at=timezone.now() + timedelta(seconds=seconds),
    )
    audit_record(
        action="token.issued",
        agent=agent,
        backend=backend.name,
        address=address,
        token_id=str(token.id),
        token=token.display_prefix,
        ttl=seconds,
    )
    return IssuedToken(token, issued.plaintext)


def tokens_live(*, agent: Agent | None = None, backend: Backend | None = None) -> list[Token]:
    tokens = Token.objects.live().select_related("agent", "backend")
    if agent is not None:
        tokens = tokens.filter(agent=agent)
    if backend is not None:
        tokens = tokens.filter(backend=backend)
    return list(tokens)


def token_get(*, token_id: str, agent: Agent | None = None) -> Token:
    """One token by id; when ``agent`` is given, only one of that agent's."""
    tokens = Token.objects.select_related("agent", "backend")
    if agent is not None:
        tokens = tokens.filter(agent=agent)
    try:
        token = tokens.filter(pk=token_id).first()
    except ValidationError:  # not a UUID
        token = None
    if token is None:
        raise NotFound(f"no token with id {token_id}")
    return token


@transaction.atomic
def token_revoke(
    *, token: Token, by: User = None, agent: Agent | None = None, reason: str = ""
) -> Token:
    """Revoke at once (idempotent); every proxy process hears of it before the next request."""
    now = timezone.now()
    updated = Token.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now)
    if updated:
        token.revoked_at = now
        audit_record(
            action="token.revoked",
            by=by,
            agent=agent or token.agent,
            backend=token.backend.name,
            message=reason,
            token_id=str(token.id),
            token=token.display_prefix,
        )
        access_changed()
    return token


@transaction.atomic
def tokens_revoke(*, tokens: Iterable[Token], by: User = None, reason: str = "") -> int:
    """Revoke these tokens together: one commit, so every proxy process is told once
    (access_changed); returns how many were live."""
    tokens = list(tokens)
    # Locked together, in one order, before the first event takes the audit chain's head:
    # two bulk revocations of overlapping tokens then queue instead of deadlocking.
    list(Token.objects.select_for_update().filter(pk__in=[t.pk for t in tokens]).order_by("pk"))
    revoked = 0
    for token in tokens:
        live = token.revoked_at is None
        token_revoke(token=token, by=by, reason=reason)
        revoked += live
    return revoked


def tokens_revoke_all(
    *, agent: Agent | None = None, backend: Backend | None = None, by: User = None, reason: str
) -> int:
    """Revoke every live token of an agent, of a backend, or of an agent for a backend;
    returns how many."""
    return tokens_revoke(tokens=tokens_live(agent=agent, backend=backend), by=by, reason=reason)


@dataclass(frozen=True)
class SweepResult:
    expired: int
    deleted: int


def tokens_sweep(*, now: datetime | None = None) -> SweepResult:
    """Record expiries and delete rows past retention. Safe to run twice at once.

    Each expiry is claimed with a conditional update, so two workers never both record it.
    """
    now = now or timezone.now()
    expired = 0
    candidates = (
        Token.objects.expired(now)
        .filter(expired_at__isnull=True)
        .select_related("agent", "backend")
    )
    for token in candidates[:1000]:
        with transaction.atomic():
            claimed = Token.objects.filter(pk=token.pk, expired_at__isnull=True).update(
                expired_at=now
            )
            if not claimed:
                continue
            audit_record(
                action="token.expired",
                agent=token.agent,
                backend=token.backend.name,
                token_id=str(token.id),
                token=token.display_prefix,
            )
            expired += 1
    cutoff = now - timedelta(seconds=settings.TOKEN_RETENTION_SECONDS)
    deleted, _ = Token.objects.filter(expires_at__lt=cutoff).delete()
    return SweepResult(expired, deleted)
