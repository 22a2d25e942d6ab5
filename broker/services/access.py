"""Who may do what: the checks every agent-facing entry point shares."""

from __future__ import annotations

import logging
import secrets

import redis
from django.db import transaction

from broker.infra.errors import NotPermitted
from broker.infra.redis import redis_client, redis_key
from broker.models import Agent, AgentStatus

logger = logging.getLogger(__name__)

# A value every proxy process reads before trusting its in-memory cache of tokens and
# backends; any change to who may call what (or to a secret) sets it to a new random value.
# Random rather than a counter, so a Redis that lost its data can never repeat an old value.
ACCESS_GENERATION = "access:generation"


def agent_require_approved(agent: Agent) -> None:
    if agent.status == AgentStatus.PENDING:
        raise NotPermitted(f"agent {agent.name} is pending approval by an admin")
    if agent.status != AgentStatus.APPROVED:
        raise NotPermitted(f"agent {agent.name} was {agent.status}")


def access_changed() -> None:
    """After commit, make every proxy process drop what it cached about tokens and backends."""

    def bump() -> None:
        try:
            redis_client().set(redis_key(ACCESS_GENERATION), secrets.token_hex(8))
        except redis.RedisError:
            # The proxy treats an unreadable counter as "changed" and asks the database.
            logger.error("could not announce an access change over Redis")

    transaction.on_commit(bump)
