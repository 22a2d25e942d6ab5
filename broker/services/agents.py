"""Agents: enrollment, approval, scopes and unenrollment."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.services import audit_record
from broker.infra.errors import Conflict, NotFound, ServiceError
from broker.infra.secrets import secret_digest, secret_issue
from broker.models import (
    Agent,
    AgentStatus,
    Backend,
    Grant,
    agent_name_validator,
    touch_last_used_row,
)
from broker.services.access import (
    VEND_PREFIX,
    access_changed,
    agent_credential_unknown,
    agent_require_enrolled,
)
from broker.services.throttles import auth_failure, auth_throttle_check
from broker.services.tokens import tokens_revoke_all
from keybroker.wire import SECRET_PATTERN

User = AbstractBaseUser | AnonymousUser | None
MAX_SCOPES = 32


@dataclass(frozen=True)
class EnrolledAgent:
    agent: Agent
    vend_token: str


def agent_clean_name(name: str) -> str:
    if len(name) > 63:
        raise ServiceError("use at most 63 characters", "name")
    try:
        agent_name_validator(name)
    except ValidationError as exc:
        raise ServiceError(exc.messages[0], "name") from None
    if SECRET_PATTERN.search(name):
        # Names are shown everywhere; a credential pasted as one would be too.
        raise ServiceError("must not look like a credential (ckr_…, crd_…, sk-ant-…)", "name")
    return name


def agent_clean_scopes(scopes: Iterable[str]) -> list[str]:
    """Scopes are backend names; every one must exist. Order kept, duplicates dropped."""
    wanted = list(dict.fromkeys(scopes))
    if len(wanted) > MAX_SCOPES:
        raise ServiceError(f"ask for at most {MAX_SCOPES}", "scopes")
    known = set(Backend.objects.filter(name__in=wanted).values_list("name", flat=True))
    unknown = [scope for scope in wanted if scope not in known]
    if unknown:
        raise ServiceError(f"no backend named {', '.join(map(repr, unknown))}", "scopes")
    return wanted


def _name_taken(name: str) -> Conflict:
    return Conflict(f"an agent named {name!r} is already enrolled")


@transaction.atomic
def agent_enroll(
    *,
    name: str,
    scopes: Iterable[str],
    description: str = "",
    address: str | None = None,
    approved_by: User = None,
) -> EnrolledAgent:
    """A new agent, pending approval; or approved at once when an admin creates it."""
    name = agent_clean_name(name)
    wanted = agent_clean_scopes(scopes)
    if len(description) > 500:
        raise ServiceError("use at most 500 characters", "description")
    if Agent.objects.filter(name=name).exclude(status=AgentStatus.UNENROLLED).exists():
        raise _name_taken(name)
    issued = secret_issue(VEND_PREFIX)
    agent = Agent(
        name=name,
        description=description,
        requested_scopes=wanted,
        vend_digest=issued.digest,
        vend_prefix=issued.display_prefix,
        enrolled_from=address,
    )
    try:
        with transaction.atomic():
            agent.save()
    except IntegrityError:
        raise _name_taken(name) from None
    audit_record(
        action="agent.enrolled", by=approved_by, agent=agent, address=address, scopes=wanted
    )
    if approved_by is not None:
        agent_approve(agent=agent, by=approved_by)
    return EnrolledAgent(agent, issued.plaintext)


def agent_authenticate(credential: str, *, address: str | None = None) -> Agent:
    """The agent behind a vend token (``ckr_…``) or one of our JWTs, in any status.

    Unknown credentials say nothing about why; an unenrolled agent is told so, since its
    token was once good and the person running it needs to know to enroll again.
    """
    from broker.services.oidc import looks_like_jwt, oidc_authenticate

    auth_throttle_check(address=address)
    if looks_like_jwt(credential):
        agent = oidc_authenticate(credential)
        method = "jwt"
    else:
        agent = Agent.objects.filter(vend_digest=secret_digest(credential)).first()
        method = "vend_token"
    if agent is None:
        auth_failure(address=address, method=method)
        raise agent_credential_unknown().error()
    agent_require_enrolled(agent)
    agent_seen(agent)
    return agent


def agent_seen(agent: Agent) -> None:
    """Note that the agent showed up; written at most once a minute."""
    touch_last_used_row(agent, field="last_seen_at")


def agent_get(*, name: str) -> Agent:
    agent = Agent.objects.exclude(status=AgentStatus.UNENROLLED).filter(name=name).first()
    if agent is None:
        raise NotFound(f"no enrolled agent named {name!r}")
    return agent


def agent_get_by_id(*, agent_id: str) -> Agent:
    try:
        agent = Agent.objects.filter(pk=agent_id).first()
    except ValidationError:
        agent = None  # not a UUID
    if agent is None:
        raise NotFound(f"no agent with id {agent_id}")
    return agent


def agent_scopes(agent: Agent) -> list[str]:
    """The backends the agent holds a grant for."""
    return list(agent.grants.order_by("backend__name").values_list("backend__name", flat=True))


def _lock(agent: Agent) -> Agent:
    return Agent.objects.select_for_update().get(pk=agent.pk)


@transaction.atomic
def agent_approve(*, agent: Agent, by: User, scopes: Iterable[str] | None = None) -> Agent:
    """Grant the requested scopes (or the narrower ``scopes`` an admin chose) and approve."""
    locked = _lock(agent)
    if locked.status in {AgentStatus.REJECTED, AgentStatus.UNENROLLED}:
        raise Conflict(f"agent {locked.name} is {locked.status}; it cannot be approved")
    if not locked.is_waiting and scopes is None:
        raise Conflict(f"agent {locked.name} is approved; nothing waits for a decision")
    requested = list(locked.requested_scopes)
    granting = agent_clean_scopes(requested if scopes is None else scopes)
    for backend in Backend.objects.filter(name__in=granting):
        agent_grant(agent=locked, backend=backend, by=by)
    was_pending = locked.status == AgentStatus.PENDING
    locked.status = AgentStatus.APPROVED
    locked.requested_scopes = []
    if was_pending:
        locked.decided_at = timezone.now()
        locked.decided_by = by if by is not None and by.is_authenticated else None  # type: ignore[assignment]
    locked.save()
    declined = [scope for scope in requested if scope not in granting]
    audit_record(action="agent.approved", by=by, agent=locked, granted=granting, declined=declined)
    _refresh(agent, locked)
    return agent


@transaction.atomic
def agent_reject(*, agent: Agent, by: User, reason: str = "") -> Agent:
    """Refuse a pending agent, or decline the extra scopes an approved one asked for."""
    locked = _lock(agent)
    if locked.status == AgentStatus.PENDING:
        locked.status = AgentStatus.REJECTED
        locked.decided_at = timezone.now()
        locked.decided_by = by if by is not None and by.is_authenticated else None  # type: ignore[assignment]
        action = "agent.rejected"
    elif locked.is_waiting:  # approved, and asking for more
        action = "agent.request_rejected"
    else:
        raise Conflict(f"agent {locked.name} is {locked.status}; nothing waits for a decision")
    declined, locked.requested_scopes = locked.requested_scopes, []
    locked.save()
    audit_record(action=action, by=by, agent=locked, message=reason[:500], declined=declined)
    _refresh(agent, locked)
    return agent


@transaction.atomic
def agent_request_scopes(*, agent: Agent, scopes: Iterable[str]) -> Agent:
    """An agent asks for more backends; they wait for an admin like an enrollment does."""
    wanted = agent_clean_scopes(scopes)
    if not wanted:
        raise ServiceError("ask for at least one backend", "scopes")
    locked = _lock(agent)
    held = set(agent_scopes(locked))
    new = [s for s in wanted if s not in held and s not in locked.requested_scopes]
    if new:
        locked.requested_scopes = [*locked.requested_scopes, *new]
        locked.save(update_fields=["requested_scopes"])
        audit_record(action="agent.scopes_requested", agent=locked, scopes=new)
    _refresh(agent, locked)
    return agent


@transaction.atomic
def agent_grant(*, agent: Agent, backend: Backend, by: User = None) -> Grant:
    """Let an agent mint tokens for a backend (idempotent)."""
    grant, created = Grant.objects.get_or_create(
        agent=agent,
        backend=backend,
        defaults={"created_by": by if by is not None and by.is_authenticated else None},
    )
    if created:
        access_changed()
        audit_record(action="grant.added", by=by, agent=agent, backend=backend.name)
    return grant


@transaction.atomic
def agent_ungrant(*, agent: Agent, backend: Backend, by: User = None) -> int:
    """Take a backend away: the grant goes and the agent's live tokens for it die at once.

    Returns how many tokens were revoked. The agent may ask for the backend again.
    Locks the agent first, as token_issue does, so no mint slips in between.
    """
    _lock(agent)
    grant = Grant.objects.filter(agent=agent, backend=backend).first()
    if grant is None:
        raise NotFound(f"agent {agent.name} holds no grant for backend {backend.name}")
    revoked = tokens_revoke_all(agent=agent, backend=backend, by=by, reason="grant removed")
    grant.delete()
    access_changed()
    audit_record(
        action="grant.removed", by=by, agent=agent, backend=backend.name, tokens_revoked=revoked
    )
    return revoked


@transaction.atomic
def agent_unenroll(*, agent: Agent, by: User = None) -> Agent:
    """The agent and every token it holds stop working at once; the row stays for history."""
    locked = _lock(agent)
    if locked.status == AgentStatus.UNENROLLED:
        return agent
    revoked = tokens_revoke_all(agent=locked, by=by, reason="agent unenrolled")
    locked.status = AgentStatus.UNENROLLED
    locked.unenrolled_at = timezone.now()
    locked.requested_scopes = []
    locked.save()
    locked.oidc_clients.filter(revoked_at__isnull=True).update(revoked_at=locked.unenrolled_at)
    audit_record(action="agent.unenrolled", by=by, agent=locked, tokens_revoked=revoked)
    _refresh(agent, locked)
    return agent


def _refresh(agent: Agent, locked: Agent) -> None:
    if agent is not locked:
        agent.refresh_from_db()
