"""Identity grants: which audiences an agent may get identity tokens (JWTs) for, and how long
each lives.

keybroker's ``/oauth/token`` mints JWTs for keybroker itself by default. An identity grant
lets an agent ask for another audience (``https://api.anthropic.com``) so that a relying
party that trusts keybroker as an issuer (Anthropic's workload identity federation) accepts
the JWT. The token endpoint enforces them (broker/services/oidc.py); this module adds,
changes, lists and removes them, for the CLI, the admin and the REST API alike.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import IntegrityError, transaction

from audit.services import audit_record
from broker.infra.errors import FieldErrors, NotFound, ServiceError
from broker.models import Agent, IdentityGrant
from broker.services.oidc import issuer
from broker.services.tokens import ttl_parse
from keybroker.wire import SECRET_PATTERN, duration_format

User = AbstractBaseUser | AnonymousUser | None

DEFAULT_LIFETIME = 600  # like a crd_ token's default: ten minutes
MIN_LIFETIME = 60
MAX_AUDIENCE_LENGTH = 255


def identity_clean_audience(raw: object) -> str:
    """An audience as a relying party will match it: exact, so only trimmed, never rewritten."""
    if not isinstance(raw, str) or not raw.strip():
        raise ServiceError(
            "give the relying party's audience, e.g. https://api.anthropic.com", "audience"
        )
    audience = raw.strip()
    problems = []
    if len(audience) > MAX_AUDIENCE_LENGTH:
        problems.append(f"use at most {MAX_AUDIENCE_LENGTH} characters")
    if any(char.isspace() or not char.isprintable() for char in audience):
        problems.append("must not contain spaces or control characters")
    if SECRET_PATTERN.search(audience):
        # Audiences show up in audit rows and pages; a credential pasted here would too.
        problems.append("must not look like a credential")
    if audience == issuer():
        problems.append("keybroker's own audience needs no grant; every agent's JWT has it")
    if problems:
        raise FieldErrors.on("audience", problems)
    return audience


def identity_max_lifetime() -> int:
    # Signing keys stay published for KEYBROKER_OIDC_TOKEN_LIFETIME after they retire, so no
    # JWT may outlive that, or a relying party could meet one whose key is gone.
    return int(settings.OIDC_TOKEN_LIFETIME_SECONDS)


def identity_lifetime_parse(value: object) -> int:
    """Seconds from ``600``, ``"90s"``, ``"10m"`` or ``"1h"``, within 1 minute and the
    issuer's token lifetime (1 hour unless lowered)."""
    try:
        seconds = ttl_parse(value)
    except ServiceError as exc:
        raise ServiceError(exc.text, "lifetime") from None
    high = identity_max_lifetime()
    if not MIN_LIFETIME <= seconds <= high:
        raise ServiceError(
            f"must be between {duration_format(MIN_LIFETIME)} and "
            f"{duration_format(high)} (got {duration_format(seconds)})",
            "lifetime",
        )
    return seconds


def identity_grants_of(agent: Agent) -> list[IdentityGrant]:
    return list(agent.identity_grants.select_related("created_by").order_by("audience"))


@transaction.atomic
def identity_grant(
    *, agent: Agent, audience: object, lifetime: object | None = None, by: User = None
) -> IdentityGrant:
    """Let the agent get identity tokens for ``audience``; again for the same audience
    changes only the lifetime (given, or kept)."""
    audience = identity_clean_audience(audience)
    seconds = None if lifetime is None else identity_lifetime_parse(lifetime)
    creator = {"created_by": by} if by is not None and by.is_authenticated else {}
    existing = IdentityGrant.objects.select_for_update().filter(agent=agent, audience=audience)
    grant = existing.first()
    if grant is None:
        try:
            with transaction.atomic():
                grant = IdentityGrant.objects.create(
                    agent=agent,
                    audience=audience,
                    lifetime=seconds or DEFAULT_LIFETIME,
                    **creator,
                )
        except IntegrityError:
            # Granted by someone else a moment ago: change that one instead.
            grant = existing.get()
        else:
            audit_record(
                action="identity.granted",
                by=by,
                agent=agent,
                audience=audience,
                lifetime=grant.lifetime,
            )
            return grant
    if seconds is not None and seconds != grant.lifetime:
        old, grant.lifetime = grant.lifetime, seconds
        grant.save(update_fields=["lifetime"])
        audit_record(
            action="identity.updated",
            by=by,
            agent=agent,
            audience=audience,
            lifetime=seconds,
            old_lifetime=old,
        )
    return grant


@transaction.atomic
def identity_revoke(*, agent: Agent, audience: str, by: User = None) -> None:
    """The agent gets no new identity tokens for ``audience``. Those already issued live out
    their (short) lifetime: a JWT handed to a relying party cannot be called back."""
    deleted, _ = IdentityGrant.objects.filter(agent=agent, audience=audience.strip()).delete()
    if not deleted:
        raise NotFound(f"agent {agent.name} has no identity grant for audience {audience!r}")
    audit_record(action="identity.revoked", by=by, agent=agent, audience=audience.strip())


def identity_grant_get(*, agent: Agent, grant_id: object) -> IdentityGrant:
    grant = None
    if isinstance(grant_id, int) or (isinstance(grant_id, str) and grant_id.isdigit()):
        grant = IdentityGrant.objects.filter(agent=agent, pk=int(grant_id)).first()
    if grant is None:
        raise NotFound(f"agent {agent.name} has no identity grant with id {grant_id}")
    return grant
