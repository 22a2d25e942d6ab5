"""Who may do what: the checks every agent-facing entry point shares.

``REFUSALS`` is the one table of why an agent or a token is turned away: the agent API,
the OAuth endpoint and the proxy all read it, so each condition has one HTTP status and
one wording everywhere (docs/errors.md shows it). Each surface only renders it in its own
shape: ``{"error": {...}}`` for the API, Anthropic's error shape for the proxy.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import redis
from django.db import IntegrityError, transaction

from audit.models import AuditEvent
from broker.infra.errors import NotPermitted, ServiceError, Unauthenticated
from broker.infra.redis import redis_client, redis_key
from broker.models import AccessGeneration, Agent, AgentStatus, TokenState, token_state_at

logger = logging.getLogger(__name__)

# A value every proxy process reads before trusting its in-memory cache of tokens and
# backends; any change to who may call what (or to a secret) sets it to a new random value.
# Random rather than a counter, so a Redis that lost its data can never repeat an old value.
ACCESS_GENERATION = "access:generation"
# Where the new value is also published: proxy processes listen instead of reading the
# generation on every request, and each says it has dropped its cache by pushing onto
# ``access:ack:<generation>`` (docs/decisions.md, "Access changes are pushed").
ACCESS_CHANNEL = "access:changed"
ACCESS_ACK = "access:ack"
# How long an announcement waits for every listening process to have dropped its cache:
# a process that does not answer in time (frozen, or gone) falls back by itself.
ACK_WAIT_SECONDS = 0.5
ACK_KEEP_SECONDS = 10
# Listening proxy processes read the generation (Redis's, then the database's copy) after
# this long without news: a backstop for news that never came.
GENERATION_CHECK_SECONDS = 1.0
# An announcement that could not reach Redis waits this long before the change's command
# or page answers, so every listening process has read the database's copy meanwhile.
UNANNOUNCED_WAIT_SECONDS = GENERATION_CHECK_SECONDS * 1.5


# Anthropic's names for the statuses the proxy refuses with, so SDKs raise the right class.
ANTHROPIC_ERROR_TYPES = {401: "authentication_error", 403: "permission_error"}
TOKEN_UNKNOWN = "unknown"  # noqa: S105  (a key of REFUSALS, not a secret)
CREDENTIAL_UNKNOWN = "credential_unknown"
# An agent's vend token starts ckr_ (its crd_ tokens are for the proxy).
VEND_PREFIX = "ckr"
# Credentials that are not for the proxy, told by their form alone (issue 20, item 4).
VEND_TOKEN_AT_PROXY = "vend_token_at_proxy"  # noqa: S105
UPSTREAM_KEY_AT_PROXY = "upstream_key_at_proxy"

# Condition -> (status, message). 401: the credential itself is no good (unknown, expired,
# revoked, or its agent unenrolled for good); asking again with it never helps.
# 403: the credential is fine but its agent may not act (yet): an admin's decision changes it.
REFUSALS: dict[str, tuple[int, str]] = {
    AgentStatus.PENDING: (403, "agent {name} is pending approval by an admin"),
    AgentStatus.REJECTED: (403, "agent {name} was rejected by an admin"),
    AgentStatus.UNENROLLED: (401, "agent {name} was unenrolled; enroll again"),
    CREDENTIAL_UNKNOWN: (401, "invalid, expired or unknown agent credential"),
    TOKEN_UNKNOWN: (401, "invalid token"),
    VEND_TOKEN_AT_PROXY: (
        401,
        "this is an agent's vend token (ckr_…), which the proxy does not take: mint a crd_ "
        "token with `keybroker get BACKEND` (POST /v1/credentials/BACKEND) and send that",
    ),
    UPSTREAM_KEY_AT_PROXY: (
        401,
        "this is an upstream API key, not a keybroker token: keybroker holds the real key; "
        "send a crd_ token from `keybroker get BACKEND` (POST /v1/credentials/BACKEND). An "
        "ANTHROPIC_API_KEY left in the environment goes out as x-api-key ahead of the "
        "token: unset it",
    ),
    TokenState.EXPIRED: (401, "token expired"),
    TokenState.REVOKED: (401, "token revoked"),
}


@dataclass(frozen=True)
class Refusal:
    """Why a caller is turned away, as every surface says it."""

    status: int
    message: str

    @property
    def anthropic_type(self) -> str:
        return ANTHROPIC_ERROR_TYPES[self.status]

    def error(self) -> ServiceError:
        return Unauthenticated(self.message) if self.status == 401 else NotPermitted(self.message)


def refusal(condition: str, **names: str) -> Refusal:
    """The table's row for ``condition`` (a key of ``REFUSALS``), its names filled in."""
    status, message = REFUSALS[condition]
    return Refusal(status, message.format(**names))


def agent_refusal(*, name: str, status: str) -> Refusal | None:
    """Why an agent in ``status`` may not act; None when it is approved."""
    if status == AgentStatus.APPROVED:
        return None
    return refusal(status, name=name)


def token_refusal(*, revoked: bool, expires_at: datetime, now: datetime) -> Refusal | None:
    """Why a known token may not be used; None while it is live."""
    state = token_state_at(revoked=revoked, expires_at=expires_at, now=now)
    return None if state == TokenState.LIVE else refusal(state)


def token_unknown() -> Refusal:
    # Says nothing about what was wrong with it: a guess learns nothing.
    return refusal(TOKEN_UNKNOWN)


def token_misplaced(presented: str) -> Refusal | None:
    """Why a credential sent to the proxy is the wrong kind, told by its form alone (which
    says nothing about whether it is valid); None for anything that may be a crd_ token."""
    if presented.startswith(f"{VEND_PREFIX}_"):
        return refusal(VEND_TOKEN_AT_PROXY)
    if presented.startswith("sk-"):  # Anthropic's and OpenAI's keys alike
        return refusal(UPSTREAM_KEY_AT_PROXY)
    return None


def agent_credential_unknown() -> Refusal:
    """A vend token or JWT that names no agent; as silent as ``token_unknown``."""
    return refusal(CREDENTIAL_UNKNOWN)


def agent_require_enrolled(agent: Agent) -> None:
    """An unenrolled agent's credential is dead for good (401); pending ones may still ask."""
    if agent.status == AgentStatus.UNENROLLED:
        raise refusal(AgentStatus.UNENROLLED, name=agent.name).error()


class Rejection(NamedTuple):
    """An admin's last "no" to an agent: what it declined and the reason given ("" none)."""

    declined: list[str]
    reason: str


DECISIONS = ("agent.approved", "agent.rejected", "agent.request_rejected")


def agent_rejection(agent: Agent) -> Rejection | None:
    """The admin's refusal, when the agent's last decision was one (its enrollment rejected,
    or more scopes declined); None otherwise. Read from the audit trail, where the decision
    and its reason are recorded (so it is kept as long as the trail keeps the event)."""
    last = (
        AuditEvent.objects.filter(
            agent=agent.name, created_at__gte=agent.created_at, action__in=DECISIONS
        )
        .order_by("-created_at", "-pk")
        .first()
    )
    if last is None or last.action == "agent.approved":
        return None
    declined = last.detail.get("declined") if isinstance(last.detail, dict) else None
    return Rejection(list(declined or []), last.message)


def agent_require_approved(agent: Agent) -> None:
    """Raise the agent's refusal (403 pending or rejected, 401 unenrolled) unless approved;
    a rejected agent is told the admin's reason, when one was given."""
    refused = agent_refusal(name=agent.name, status=agent.status)
    if refused is None:
        return
    if agent.status == AgentStatus.REJECTED:
        rejection = agent_rejection(agent)
        if rejection is not None and rejection.reason:
            refused = Refusal(refused.status, f"{refused.message}: {rejection.reason}")
    raise refused.error()


def access_changed() -> None:
    """Make every proxy process drop what it cached about tokens and backends once this
    transaction commits, and return (after commit) once each listening process has, so
    that a revocation is in force everywhere when the command or page that made it answers.

    The news goes over Redis; the generation is also written in this transaction, so a
    process that never got the news (the announcer could not reach Redis) sees the change
    at its next check (docs/decisions.md, "Access changes are pushed").
    """
    _record_generation(secrets.token_hex(8))
    transaction.on_commit(_announce_latest)


def _record_generation(generation: str) -> None:
    if AccessGeneration.objects.filter(pk=1).update(value=generation):
        return
    try:
        with transaction.atomic():
            AccessGeneration.objects.create(pk=1, value=generation)
    except IntegrityError:  # another change created the row meanwhile: it is ours now
        AccessGeneration.objects.filter(pk=1).update(value=generation)


def recorded_generation() -> str:
    """The database's copy of the access generation ("" before the first change)."""
    return AccessGeneration.objects.filter(pk=1).values_list("value", flat=True).first() or ""


# The generation this thread last announced (or tried to).
_announced = threading.local()


def _announce_latest() -> None:
    """Announce the generation the database holds now, once however many changes one
    transaction made: their callbacks all run after the same commit, and the first one
    announces the last value written (and, when Redis refuses, waits once for them all)."""
    generation = recorded_generation()
    if getattr(_announced, "generation", None) == generation:
        return
    _announced.generation = generation
    _announce(generation)


def _announce(generation: str) -> None:
    client = redis_client()
    try:
        with client.pipeline(transaction=True) as announcing:  # the value and the news
            announcing.set(redis_key(ACCESS_GENERATION), generation)
            announcing.publish(redis_key(ACCESS_CHANNEL), generation)
            listeners = int(announcing.execute()[1])
        _await_acks(client, generation, listeners)
    except redis.RedisError:
        # Processes that cannot read Redis either ask the database on each request; those
        # that can find the database's copy changed at their next check.
        logger.error(
            "could not announce an access change over Redis; proxy processes see it in "
            "the database within %.1f s",
            UNANNOUNCED_WAIT_SECONDS,
        )
        time.sleep(UNANNOUNCED_WAIT_SECONDS)


def _await_acks(client: redis.Redis, generation: str, listeners: int) -> None:
    acks = redis_key(ACCESS_ACK, generation)
    deadline = time.monotonic() + ACK_WAIT_SECONDS
    try:
        for answered in range(listeners):
            left = deadline - time.monotonic()
            if left <= 0 or client.blpop([acks], timeout=left) is None:
                logger.warning(
                    "%d of %d proxy processes did not confirm an access change in time",
                    listeners - answered,
                    listeners,
                )
                return
    finally:
        client.delete(acks)
