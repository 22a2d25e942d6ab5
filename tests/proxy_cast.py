"""A token and the proxy URL to use it with, against the fake upstream, through a live server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser

from audit.recorder import FLUSH_INTERVAL_SECONDS, audit_backlog
from broker.models import Backend
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.tokens import token_issue
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key


@dataclass(frozen=True)
class Proxied:
    base_url: str  # what the SDK gets: {live_url}/v1/proxy/anthropic
    token: str
    token_id: str
    key: str  # the real upstream key behind it
    backend: Backend


def proxied_for(
    *, live_url: str, fake: FakeAnthropic, alice: AbstractBaseUser, name: str = "bob"
) -> Proxied:
    key = api_key(tail="Up5t")
    fake.valid_keys.add(key)
    backend = Backend.objects.filter(name="anthropic").first() or backend_add(
        name="anthropic", secret=key, base_url=fake.url
    )
    agent = agent_enroll(name=name, scopes=["anthropic"], approved_by=alice).agent
    issued = token_issue(agent=agent, backend_name="anthropic", ttl="30m")
    return Proxied(
        base_url=f"{live_url}/v1/proxy/anthropic",
        token=issued.plaintext,
        token_id=str(issued.token.pk),
        key=key,
        backend=backend,
    )


def audit_drained(timeout: float = 10.0) -> None:
    """Wait until the live server has written every queued audit event.

    Otherwise a write could land after the test, in the next test's database.
    """
    deadline = time.monotonic() + timeout
    while audit_backlog() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(FLUSH_INTERVAL_SECONDS * 2)  # a batch that was being written as we looked
    assert audit_backlog() == 0, "the audit recorder did not drain"


@pytest.fixture
def proxied(
    live_url: str, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser, settings: Any
) -> Iterator[Proxied]:
    # The server runs in this process, so it answers with the URL the test reaches it on.
    settings.PUBLIC_URL = live_url
    yield proxied_for(live_url=live_url, fake=fake_anthropic, alice=alice)
    audit_drained()
