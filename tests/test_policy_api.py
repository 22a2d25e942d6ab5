"""Policy over REST: alice sets bob's grant and the backend's defaults through the admin
API, and bob reads his own limits, and what is left of them, from /v1/status."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from broker.models import Agent, Backend, Grant
from broker.services.agents import agent_approve
from broker.services.policy import grant_policy, grant_update, grant_values
from proxy.policy import PolicyDenied, PolicyGate
from tests.agents import as_agent, enroll, send

pytestmark = pytest.mark.django_db


@pytest.fixture
def bob(anthropic: Backend) -> tuple[Agent, str]:
    agent, vend_token = enroll("bob")
    agent_approve(agent=agent, by=None)
    return agent, vend_token


def grant_url(agent: Agent, backend: str = "anthropic") -> str:
    return f"/v1/admin/agents/{agent.pk}/grants/{backend}"


def bobs_grant() -> Grant:
    return Grant.objects.select_related("agent", "backend").get(agent__name="bob")


def test_alice_sets_and_reads_bobs_policy(admin_api: Client, bob: tuple[Agent, str]) -> None:
    agent, _ = bob
    changed = send(
        admin_api,
        "patch",
        grant_url(agent),
        {"models": ["claude-haiku-*"], "rpm": 3, "max_ttl": "30m", "daily_tokens": 10_000},
    )
    assert changed.status_code == 200, changed.content
    body = changed.json()
    assert body["policy"]["models"] == ["claude-haiku-*"]
    assert (body["effective"]["rpm"], body["effective"]["max_ttl"]) == (3, 1800)
    assert body["sources"]["rpm"] == "grant"
    assert send(admin_api, "patch", grant_url(agent), {"rpm": None}).json()["policy"]["rpm"] is None
    assert admin_api.get(grant_url(agent)).json()["effective"]["rpm"] is None
    assert AuditEvent.objects.filter(action="grant.updated").count() == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"rpm": -1}, "rpm: must be at least 1, not -1"),
        ({"rpm": "3"}, "rpm: A valid integer is required."),
        ({"tpm": 2.5}, "tpm: A valid integer is required."),
        ({"models": "claude-*"}, "models: Expected a list of items"),
        ({"models": ["claude-[haiku"]}, "has a [ that is never closed"),
        ({"paths": ["v1/models"]}, "must start with /"),
        ({"max_ttl": "2h"}, "max_ttl: 2h is above backend anthropic's bound of 1h"),
        ({"budget": 5}, "budget: unknown field"),
    ],
)
def test_bad_input_is_a_400_and_changes_nothing(
    admin_api: Client, bob: tuple[Agent, str], body: dict[str, Any], message: str
) -> None:
    agent, _ = bob
    before = grant_values(bobs_grant())
    refused = send(admin_api, "patch", grant_url(agent), {"max_tokens": 100, **body})
    assert refused.status_code == 400
    assert message in refused.json()["error"]["message"]
    assert grant_values(bobs_grant()) == before


def test_a_grant_added_over_rest_can_carry_its_policy(
    admin_api: Client, bob: tuple[Agent, str], staging: Backend
) -> None:
    agent, _ = bob
    refused = send(
        admin_api,
        "post",
        f"/v1/admin/agents/{agent.pk}/grants",
        {"backend": "anthropic-staging", "rpm": 0},
    )
    assert refused.status_code == 400
    assert not Grant.objects.filter(agent=agent, backend=staging).exists()
    added = send(
        admin_api,
        "post",
        f"/v1/admin/agents/{agent.pk}/grants",
        {"backend": "anthropic-staging", "paths": ["/v1/messages*"]},
    )
    assert added.status_code == 201
    assert admin_api.get(grant_url(agent, "anthropic-staging")).json()["policy"]["paths"] == [
        "/v1/messages*"
    ]


def test_an_unknown_grant_is_a_404(admin_api: Client, bob: tuple[Agent, str]) -> None:
    agent, _ = bob
    assert admin_api.get(grant_url(agent, "anthropic-staging")).status_code == 404
    assert admin_api.get("/v1/admin/agents/nope/grants/anthropic").status_code == 404


def test_backend_defaults_over_rest(
    admin_api: Client, bob: tuple[Agent, str], anthropic: Backend
) -> None:
    url = "/v1/admin/backends/anthropic/policy"
    set_ = send(admin_api, "patch", url, {"rpm": 30, "models": ["claude-*"]})
    assert set_.status_code == 200, set_.content
    assert set_.json()["defaults"]["rpm"] == 30
    assert admin_api.get(url).json()["defaults"]["max_ttl"] == anthropic.token_ttl_max
    assert grant_policy(bobs_grant()).rpm == 30
    refused = send(admin_api, "patch", url, {"max_ttl": "30m"})
    assert refused.status_code == 400
    assert "max_ttl: unknown field" in refused.json()["error"]["message"]
    assert Client().get(url).status_code == 401


def spend(grant: Grant, tokens: int) -> None:
    """One call of bob's through the proxy's gate, using ``tokens``, as the proxy would."""

    async def call() -> None:
        gate = PolicyGate()
        ticket = await gate.admit(grant_policy(grant), agent="bob", backend="anthropic")
        assert ticket is not None
        counting = gate.settle(ticket, {"input_tokens": tokens - 1, "output_tokens": 1})
        assert counting is not None
        await counting

    asyncio.run(call())


def test_bob_reads_his_limits_and_what_is_left(bob: tuple[Agent, str]) -> None:
    _, vend_token = bob
    grant_update(
        grant=bobs_grant(),
        policy={"models": ["claude-haiku-*"], "rpm": 3, "daily_tokens": 100, "max_ttl": "5m"},
    )
    spend(bobs_grant(), 30)
    spend(bobs_grant(), 25)

    (grant,) = as_agent(vend_token).get("/v1/status").json()["grants"]
    assert grant["ttl"] == {"min": 60, "default": 300, "max": 300}
    limits = grant["limits"]
    assert limits["models"] == ["claude-haiku-*"]
    assert (limits["paths"], limits["max_tokens"]) == ([], None)
    assert limits["tpm"] is None
    rpm, daily = limits["rpm"], limits["daily_tokens"]
    assert (rpm["limit"], rpm["used"], rpm["remaining"]) == (3, 2, 1)
    assert 1 <= rpm["resets_in"] <= 60
    assert (daily["limit"], daily["used"], daily["remaining"]) == (100, 55, 45)
    assert 1 <= daily["resets_in"] <= 86_400


def test_the_gate_refuses_once_the_budget_is_spent(bob: tuple[Agent, str]) -> None:
    grant_update(grant=bobs_grant(), policy={"daily_tokens": 50})
    spend(bobs_grant(), 50)
    with pytest.raises(PolicyDenied) as refused:
        spend(bobs_grant(), 1)
    assert (refused.value.status, refused.value.rule) == (429, "daily_tokens")
    assert (b"x-should-retry", b"false") in refused.value.headers
