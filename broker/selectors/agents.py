"""Reads about agents: who waits for a decision, and what an agent did lately."""

from __future__ import annotations

from typing import NamedTuple

from audit.models import AuditEvent
from broker.models import Agent, Token
from broker.selectors.tokens import tokens_query

RECENT_EVENTS = 20
RECENT_TOKENS = 50


class RecentTokens(NamedTuple):
    tokens: list[Token]
    total: int


def agents_waiting() -> list[Agent]:
    """Agents waiting for a decision (``Agent.objects.waiting()``), oldest first."""
    return list(Agent.objects.waiting().order_by("created_at"))


def agent_recent_events(agent: Agent, limit: int = RECENT_EVENTS) -> list[AuditEvent]:
    """The agent's latest audit events, newest first."""
    # Events name the agent, not its id, and an unenrolled agent's name may be taken again:
    # nothing from before this agent existed belongs to it.
    return list(
        AuditEvent.objects.filter(agent=agent.name, created_at__gte=agent.created_at)[:limit]
    )


def agent_recent_tokens(agent: Agent, limit: int = RECENT_TOKENS) -> RecentTokens:
    """The agent's latest tokens in any state, newest first, and how many it has on record."""
    tokens = tokens_query(agent=agent)
    return RecentTokens(list(tokens[:limit]), tokens.count())
