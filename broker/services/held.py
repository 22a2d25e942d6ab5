"""Held calls: proxied calls that wait for a person's approval (a grant's ``hold`` rule).

The proxy process that holds a call writes its record to Redis (metadata only: never the
body, never a credential), indexed by deadline, and waits for a decision: a key written once
(``SET NX``, so the first decision wins) and announced on a pub/sub channel, so a person
deciding in a page served by another process reaches the one that holds the call. Every
record and decision carries a TTL a little past its deadline: nothing lingers after a
process dies. What the proxy does while it waits is proxy/hold.py's; docs/decisions.md,
"Held calls (issue 18, part 2)", says why.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction

from audit.services import audit_record
from broker.infra.errors import Conflict, NotFound, Unavailable
from broker.infra.redis import redis_client, redis_key
from broker.models import Agent
from keybroker.wire import redact

User = AbstractBaseUser | AnonymousUser | None

logger = logging.getLogger(__name__)

HELD_INDEX = "held:calls"  # sorted set: hold id → deadline, in ms since the epoch
HELD_CHANNEL = "held:decided"  # publishes the id of each decided hold
# A record and its decision outlive the deadline by this much, then Redis drops them.
KEEP_SECONDS = 60
HOLD_ID = re.compile(r"^hld_[0-9a-f]{16}$")
APPROVED, DENIED, EXPIRED, WITHDRAWN = "approved", "denied", "expired", "withdrawn"
# Who decided when no person did: a call's process stopping while it was held.
STOPPED_BY = "keybroker (stopping)"
CLI_BY = "manage.py held"


def held_key(held_id: str) -> str:
    return redis_key("held", "call", held_id)


def decision_key(held_id: str) -> str:
    return redis_key("held", "decision", held_id)


@dataclass(frozen=True)
class HeldCall:
    """A held call as every process sees it. Metadata only."""

    id: str
    agent: str
    agent_id: str
    backend: str
    method: str
    path: str
    model: str
    max_tokens: int | None
    stream: bool
    rule: str  # which part of the hold rule matched: all, models, paths, max_tokens_above
    token_prefix: str
    held_at: float  # seconds since the epoch
    deadline: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> HeldCall:
        return cls(**json.loads(raw))

    def json(self) -> dict[str, Any]:
        """As the admin API, the activity page and the CLI show it."""
        data = asdict(self)
        data["held_at"] = _iso(self.held_at)
        data["deadline"] = _iso(self.deadline)
        return data

    @property
    def ttl(self) -> int:
        return max(1, int(self.deadline - time.time()) + KEEP_SECONDS)


@dataclass(frozen=True)
class Decision:
    """What became of a held call: ``approved`` or ``denied`` by a person, ``expired`` when
    nobody decided in time, ``withdrawn`` when its client hung up."""

    decision: str
    by: str = ""
    reason: str = ""
    at: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Decision:
        return cls(**json.loads(raw))

    @property
    def approved(self) -> bool:
        return self.decision == APPROVED

    def said(self) -> str:
        """``denied by alice: too costly``: how the decision reads in a message."""
        by = f" by {self.by}" if self.by else ""
        return f"{self.decision}{by}" + (f": {self.reason}" if self.reason else "")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def user_name(by: User) -> str:
    if by is None or not by.is_authenticated:
        return CLI_BY
    return str(by.get_username())


def held_call_get(*, held_id: str) -> tuple[HeldCall | None, Decision | None]:
    """A hold's record and its decision, each None when Redis has none (any more)."""
    if not HOLD_ID.match(held_id):
        return None, None
    try:
        raw, decided = redis_client().mget([held_key(held_id), decision_key(held_id)])
    except (redis.RedisError, OSError) as exc:
        raise Unavailable(f"held calls cannot be read: Redis is unreachable ({exc})") from None
    call = HeldCall.decode(raw) if raw is not None else None
    return call, Decision.decode(decided) if decided is not None else None


def held_call_decide(*, held_id: str, approve: bool, by: User, reason: str = "") -> HeldCall:
    """Approve or deny a held call, once: the first decision wins, in whichever process it
    was made. 404 for a hold that does not exist (or ended a minute ago), 409 for one
    already decided or past its deadline."""
    call, decided = held_call_get(held_id=held_id)
    if decided is not None:
        raise Conflict(f"held call {held_id} was already {decided.said()}")
    if call is None:
        raise NotFound(f"no held call {held_id[:40]!r}: it never was, or it ended a while ago")
    if call.deadline <= time.time():
        raise Conflict(f"held call {held_id} timed out before anyone decided")
    # Shown to the agent and kept in the trail: a key pasted into it never is.
    reason = redact(reason.strip()[:200])
    decision = Decision(
        decision=APPROVED if approve else DENIED, by=user_name(by), reason=reason, at=time.time()
    )
    # Recorded first, in the transaction that a lost race rolls back: the trail then shows
    # the decision before the call it let through.
    with transaction.atomic():
        _audit_decided(call, decision, by)
        client = redis_client()
        try:
            if not client.set(decision_key(held_id), decision.encode(), nx=True, ex=call.ttl):
                _, decided = held_call_get(held_id=held_id)
                said = decided.said() if decided is not None else "decided"
                raise Conflict(f"held call {held_id} was already {said}")
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(
                f"the decision was not recorded: Redis is unreachable ({exc})"
            ) from None
    try:
        client.publish(redis_key(HELD_CHANNEL), held_id)
    except (redis.RedisError, OSError) as exc:
        # Decided all the same: the holding process reads the decision keys every moment.
        logger.warning("a held call's decision was not announced (%s)", type(exc).__name__)
    return call


def _audit_decided(call: HeldCall, decision: Decision, by: User) -> None:
    audit_record(
        action="proxy.hold_decided",
        by=by,
        agent=Agent.objects.filter(pk=call.agent_id).first(),
        backend=call.backend,
        message=f"held call {call.method} {call.path} {decision.said()}",
        method=call.method,
        path=call.path,
        model=call.model,
        hold_id=call.id,
        decision=decision.decision,
        decided_by=decision.by,
        reason=decision.reason,
        held_ms=round((decision.at - call.held_at) * 1000, 2),
    )
