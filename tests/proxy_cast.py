"""A token and the proxy URL to use it with, against the fake upstream, through a live server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser

from audit import recorder
from broker.models import Agent, Backend
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.tokens import token_issue
from keybroker import cli
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key
from tests.servers import live_server_settled
from tests.waiting import wait_until


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


def loop_audit_dropped() -> None:
    """Forget this event loop's audit queue: for a test that drives the proxy's gate in a
    short-lived loop (``asyncio.run``). A budget crossed queues its audit event (the alert,
    issue 17) there; the proxy's own loop writes them, but this one is about to close, and
    what it held would count as the process' audit backlog forever."""
    queued = recorder._recorders.pop()
    if queued is not None and queued.task is not None:
        queued.task.cancel()


def audit_drained(timeout: float = 10.0) -> None:
    """Wait until the live server has finished every call and written every audit event.

    Otherwise a write could land after the test, in the next test's database.
    """
    wait_until(
        live_server_settled,
        timeout=timeout,
        what="the live server to finish its calls and write their audit events",
    )


@pytest.fixture
def proxied(
    live_url: str, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser, settings: Any
) -> Iterator[Proxied]:
    # The server runs in this process, so it answers with the URL the test reaches it on.
    settings.PUBLIC_URL = live_url
    yield proxied_for(live_url=live_url, fake=fake_anthropic, alice=alice)
    audit_drained()


@dataclass(frozen=True)
class Enrolled:
    agent: Agent
    config: Path  # its keybroker config, as `keybroker enroll` writes it
    key: str  # the real upstream key behind the backend


@pytest.fixture
def bob_enrolled(
    live_url: str,
    fake_anthropic: FakeAnthropic,
    alice: AbstractBaseUser,
    settings: Any,
    tmp_path: Path,
) -> Iterator[Enrolled]:
    """bob, approved for anthropic (1-minute tokens allowed), with his keybroker config:
    he mints his own tokens, through the live server."""
    settings.PUBLIC_URL = live_url
    key = api_key(tail="Rn3w")
    fake_anthropic.valid_keys.add(key)
    backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    enrolled = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice)
    config = tmp_path / "kb" / "config.json"
    cli.save_config(
        config,
        cli.Config(
            url=live_url,
            name="bob",
            agent_id=str(enrolled.agent.pk),
            vend_token=enrolled.vend_token,
        ),
    )
    yield Enrolled(agent=enrolled.agent, config=config, key=key)
    audit_drained()
