"""Who calls in the fault cases: agents with a grant on the anthropic backend, and the
call they make through a web process under test."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
from django.contrib.auth.models import AbstractBaseUser

from broker.models import Grant
from broker.services.agents import agent_enroll
from broker.services.policy import grant_update
from broker.services.tokens import IssuedToken, token_issue

# A correctness bound, not a benchmark: a call that takes longer is a hang.
ANSWER_BOUND_SECONDS = 5.0
MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": []}


def agent_token(name: str, alice: AbstractBaseUser, **policy: Any) -> IssuedToken:
    """A new agent on the anthropic backend, with this policy on its grant, and its token."""
    agent = agent_enroll(name=name, scopes=["anthropic"], approved_by=alice).agent
    if policy:
        grant_update(grant=Grant.objects.get(agent=agent), policy=policy)
    return token_issue(agent=agent, backend_name="anthropic", ttl="30m")


@dataclass
class Answer:
    kind: str
    started: float
    ended: float
    status: int  # 0: no answer within the client's timeout
    message: str  # keybroker's or the upstream's error message

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def call(url: str, token: str, kind: str) -> Answer:
    """POST /v1/messages through the web process at ``url``; never raises."""
    started = time.monotonic()
    try:
        response = httpx.post(
            f"{url}/v1/proxy/anthropic/v1/messages",
            json=MESSAGE,
            headers={"x-api-key": token},
            timeout=ANSWER_BOUND_SECONDS + 5,
        )
    except httpx.HTTPError as exc:
        return Answer(kind, started, time.monotonic(), 0, type(exc).__name__)
    message = ""
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"not Anthropic's error body: {response.text[:100]!r}"
    return Answer(kind, started, time.monotonic(), response.status_code, message)
