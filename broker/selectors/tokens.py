"""Reads about ``crd_`` tokens; their states are the ones ``TokenQuerySet`` defines."""

from __future__ import annotations

from datetime import datetime

from django.db.models import QuerySet

from broker.models import Agent, Token

TOKENS_LISTED = 1000


def tokens_query(
    *,
    agent: Agent | None = None,
    agent_name: str | None = None,
    backend_name: str | None = None,
    state: str | None = None,
    now: datetime | None = None,
) -> QuerySet[Token]:
    """Tokens newest first, with agent and backend; ``state`` is live, expired or revoked
    (None: all). ValueError for an unknown state."""
    tokens = Token.objects.all() if state is None else Token.objects.in_state(state, now)
    if agent is not None:
        tokens = tokens.filter(agent=agent)
    if agent_name:
        tokens = tokens.filter(agent__name=agent_name)
    if backend_name:
        tokens = tokens.filter(backend__name=backend_name)
    return tokens.select_related("agent", "backend")


def tokens_list(
    *,
    agent_name: str | None = None,
    backend_name: str | None = None,
    state: str | None = None,
    limit: int = TOKENS_LISTED,
) -> list[Token]:
    """What the admin API and ``manage.py token ls`` list: at most ``limit`` tokens."""
    tokens = tokens_query(agent_name=agent_name, backend_name=backend_name, state=state)
    return list(tokens[:limit])
