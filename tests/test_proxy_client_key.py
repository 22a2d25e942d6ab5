"""Behavry's mode: a backend that stores no key; each agent brings its own."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import call_command

from audit.models import AuditEvent
from broker.models import Backend
from broker.services.agents import agent_enroll
from broker.services.tokens import token_issue
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key
from tests.proxy_cast import audit_drained

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def own_key_backend(
    live_url: str, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser, settings: Any
) -> Iterator[tuple[str, str]]:
    settings.PUBLIC_URL = live_url
    out = io.StringIO()
    call_command(
        "backend", "add", "team", "--client-key", "--base-url", fake_anthropic.url, stdout=out
    )
    assert "agents send their own key in X-Anthropic-Key" in out.getvalue()
    agent = agent_enroll(name="carol", scopes=["team"], approved_by=alice).agent
    yield f"{live_url}/v1/proxy/team", token_issue(agent=agent, backend_name="team").plaintext
    audit_drained()  # no event of this test may land in the next one's database


def test_the_agents_own_key_goes_upstream_and_nowhere_else(
    own_key_backend: tuple[str, str], fake_anthropic: FakeAnthropic
) -> None:
    base_url, token = own_key_backend
    own_key = api_key(tail="Own1")
    fake_anthropic.valid_keys.add(own_key)
    client = anthropic.Anthropic(
        base_url=base_url, api_key=token, default_headers={"X-Anthropic-Key": own_key}
    )
    reply = client.messages.create(
        model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.usage.output_tokens == 6
    seen = fake_anthropic.requests[-1]
    assert seen.headers["x-api-key"] == own_key
    assert "x-anthropic-key" not in seen.headers
    assert token not in str(seen.headers)
    audit_drained()
    event = AuditEvent.objects.get(action="proxy.request")
    assert event.agent == "carol"
    every_column = str(list(AuditEvent.objects.values()))
    assert own_key not in every_column
    assert token not in every_column
    assert Backend.objects.get(name="team").secret == ""


def test_without_its_own_key_an_agent_is_told_what_to_send(
    own_key_backend: tuple[str, str], fake_anthropic: FakeAnthropic
) -> None:
    base_url, token = own_key_backend
    missing = httpx.post(f"{base_url}/v1/messages", json={}, headers={"x-api-key": token})
    assert missing.status_code == 401
    assert "X-Anthropic-Key" in missing.json()["error"]["message"]
    garbage = httpx.post(
        f"{base_url}/v1/messages",
        json={},
        headers={"x-api-key": token, "x-anthropic-key": "not-a-key"},
    )
    assert garbage.status_code == 401
    assert fake_anthropic.requests == []


def test_a_client_key_backend_has_nothing_to_rotate_or_validate(
    own_key_backend: tuple[str, str],
) -> None:
    from broker.infra.errors import ServiceError
    from broker.services.backends import backend_rotate, backend_validate

    team = Backend.objects.get(name="team")
    with pytest.raises(ServiceError, match="own keys"):
        backend_rotate(backend=team, secret=api_key())
    assert backend_validate(backend=team).state == "unknown"
