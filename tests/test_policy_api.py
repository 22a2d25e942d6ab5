"""Policy over REST: alice sets bob's grant and the backend's defaults through the admin
API, and bob reads his own limits, and what is left of them, from /v1/status."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from broker.infra.redis import async_redis_client, redis_breaker
from broker.models import Agent, Backend, Grant
from broker.selectors.policy import policy_left
from broker.services.agents import agent_approve
from broker.services.policy import grant_policy, grant_update, grant_values
from proxy.policy import PolicyDenied, PolicyGate
from tests.agents import as_agent, enroll, send
from tests.proxy_cast import loop_audit_dropped

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
        ({"max_concurrent": 0}, "max_concurrent: must be at least 1, not 0"),
        ({"max_concurrent": 10_001}, "max_concurrent: must be at most 10,000"),
        ({"max_concurrent": "8"}, "max_concurrent: A valid integer is required."),
        ({"budget": 5}, "budget: unknown field"),
        ({"daily_usd": "-5"}, "daily_usd: must be more than 0, not -5"),
        ({"daily_usd": -5}, "daily_usd: must be more than 0, not -5"),
        ({"daily_usd": "twenty"}, "daily_usd: 'twenty' is not an amount in US dollars"),
        ({"daily_usd": "NaN"}, 'daily_usd: must be an amount in US dollars, such as "25.00"'),
        ({"monthly_usd": "1000001"}, "monthly_usd: must be at most 1,000,000 USD"),
        ({"monthly_usd": 1e9}, "monthly_usd: must be at most 1,000,000 USD"),
        ({"monthly_usd": True}, 'monthly_usd: give an amount in US dollars, such as "25.00"'),
        ({"monthly_usd": {"usd": 5}}, "monthly_usd: give an amount in US dollars"),
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
        loop_audit_dropped()

    asyncio.run(call())


def test_bob_reads_his_limits_and_what_is_left(bob: tuple[Agent, str]) -> None:
    _, vend_token = bob
    grant_update(
        grant=bobs_grant(),
        policy={
            "models": ["claude-haiku-*"],
            "rpm": 3,
            "daily_tokens": 100,
            "max_ttl": "5m",
            "max_concurrent": 2,
        },
    )
    spend(bobs_grant(), 30)
    spend(bobs_grant(), 25)

    (grant,) = as_agent(vend_token).get("/v1/status").json()["grants"]
    assert grant["ttl"] == {"min": 60, "default": 300, "max": 300}
    limits = grant["limits"]
    assert limits["models"] == ["claude-haiku-*"]
    assert (limits["paths"], limits["max_tokens"], limits["max_concurrent"]) == ([], None, 2)
    assert limits["tpm"] is None
    rpm, daily = limits["rpm"], limits["daily_tokens"]
    assert (rpm["limit"], rpm["used"], rpm["remaining"]) == (3, 2, 1)
    assert 1 <= rpm["resets_in"] <= 60
    assert (daily["limit"], daily["used"], daily["remaining"]) == (100, 55, 45)
    assert 1 <= daily["resets_in"] <= 86_400


def test_a_call_is_counted_while_a_burst_holds_every_request_path_connection(
    bob: tuple[Agent, str], settings: Any
) -> None:
    settings.PROXY_REDIS_CONNECTIONS = 3
    grant_update(grant=bobs_grant(), policy={"daily_tokens": 1000})
    policy = grant_policy(bobs_grant())

    async def call() -> None:
        gate = PolicyGate()
        ticket = await gate.admit(policy, agent="bob", backend="anthropic")
        assert ticket is not None
        pool = async_redis_client().connection_pool
        # What a burst of admissions does: every connection of the request path is taken.
        held = [await pool.get_connection() for _ in range(settings.PROXY_REDIS_CONNECTIONS)]
        try:
            counting = gate.settle(ticket, {"input_tokens": 99, "output_tokens": 1})
            assert counting is not None
            await counting
        finally:
            for connection in held:
                await pool.release(connection)

    asyncio.run(call())
    assert policy_left(policy)["daily_tokens"]["used"] == 100


def test_a_busy_pool_refuses_the_call_but_does_not_take_redis_for_gone(
    bob: tuple[Agent, str], settings: Any
) -> None:
    settings.PROXY_REDIS_CONNECTIONS, settings.PROXY_REDIS_WAIT_SECONDS = 2, 0.2
    grant_update(grant=bobs_grant(), policy={"rpm": 100})
    policy = grant_policy(bobs_grant())

    async def call() -> bool:
        pool = async_redis_client().connection_pool
        held = [await pool.get_connection() for _ in range(settings.PROXY_REDIS_CONNECTIONS)]
        try:
            with pytest.raises(PolicyDenied) as refused:
                await PolicyGate().admit(policy, agent="bob", backend="anthropic")
            assert (refused.value.status, refused.value.rule) == (503, "unavailable")
        finally:
            for connection in held:
                await pool.release(connection)
        return redis_breaker().open

    assert asyncio.run(call()) is False  # the next call asks Redis again


def test_the_gate_refuses_once_the_budget_is_spent(bob: tuple[Agent, str]) -> None:
    grant_update(grant=bobs_grant(), policy={"daily_tokens": 50})
    spend(bobs_grant(), 50)
    with pytest.raises(PolicyDenied) as refused:
        spend(bobs_grant(), 1)
    assert (refused.value.status, refused.value.rule) == (429, "daily_tokens")
    assert (b"x-should-retry", b"false") in refused.value.headers


def test_max_concurrent_over_rest_on_the_grant_and_the_backend(
    admin_api: Client, bob: tuple[Agent, str]
) -> None:
    agent, _ = bob
    defaults = send(
        admin_api, "patch", "/v1/admin/backends/anthropic/policy", {"max_concurrent": 6}
    )
    assert defaults.status_code == 200, defaults.content
    assert defaults.json()["defaults"]["max_concurrent"] == 6
    inherited = admin_api.get(grant_url(agent)).json()
    assert (inherited["policy"]["max_concurrent"], inherited["effective"]["max_concurrent"]) == (
        None,
        6,
    )
    assert inherited["sources"]["max_concurrent"] == "backend"

    own = send(admin_api, "patch", grant_url(agent), {"max_concurrent": 3}).json()
    assert (own["effective"]["max_concurrent"], own["sources"]["max_concurrent"]) == (3, "grant")
    assert grant_policy(bobs_grant()).max_concurrent == 3
    back = send(admin_api, "patch", grant_url(agent), {"max_concurrent": None}).json()
    assert back["effective"]["max_concurrent"] == 6

    refused = send(
        admin_api, "patch", "/v1/admin/backends/anthropic/policy", {"max_concurrent": 10**6}
    )
    assert refused.status_code == 400
    assert "max_concurrent: must be at most 10,000" in refused.json()["error"]["message"]


def test_max_concurrent_is_in_the_schema(admin_api: Client) -> None:
    schema = Client().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    components = schema["components"]["schemas"]
    for name in (
        "PatchedGrantPolicyInputRequest",
        "PatchedBackendPolicyInputRequest",
        "GrantInputRequest",
        "PolicyValuesOutput",
        "GrantLimitsOutput",
    ):
        assert "max_concurrent" in components[name]["properties"], name
