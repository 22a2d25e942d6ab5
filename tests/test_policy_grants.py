"""Setting policy on bob's grant, from the services and the server CLI: backend defaults,
what a grant inherits, bad input refused with nothing saved, and the max TTL at minting."""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import CommandError, call_command

from audit.models import AuditEvent
from broker.infra.errors import ServiceError
from broker.models import Agent, Backend, Grant
from broker.services.agents import agent_enroll
from broker.services.policy import (
    backend_policy_update,
    grant_policy,
    grant_set,
    grant_update,
    grant_values,
)
from broker.services.tokens import token_issue

pytestmark = pytest.mark.django_db


@pytest.fixture
def bob(anthropic: Backend, alice: AbstractBaseUser) -> Agent:
    return agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent


def grant_of(agent: Agent, backend: str = "anthropic") -> Grant:
    return Grant.objects.select_related("agent", "backend").get(agent=agent, backend__name=backend)


def manage(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_a_grant_takes_the_backends_defaults_where_it_sets_nothing(
    bob: Agent, anthropic: Backend
) -> None:
    backend_policy_update(
        backend=anthropic, policy={"models": ["claude-haiku-*"], "rpm": 60, "tpm": 10_000}
    )
    grant_update(grant=grant_of(bob), policy={"tpm": 500, "daily_tokens": 1_000_000})
    policy = grant_policy(grant_of(bob))
    assert (policy.models, policy.rpm, policy.tpm) == (("claude-haiku-*",), 60, 500)
    assert (policy.daily_tokens, policy.max_tokens, policy.max_ttl) == (1_000_000, None, None)

    # "*" is how a grant opts out of a backend's model list; null goes back to following it.
    grant_update(grant=grant_of(bob), policy={"models": ["*"], "tpm": None})
    policy = grant_policy(grant_of(bob))
    assert (policy.models, policy.tpm) == (("*",), 10_000)
    assert grant_values(grant_of(bob))["tpm"] is None


def test_a_change_is_audited_with_what_changed_and_only_then(bob: Agent) -> None:
    grant_update(grant=grant_of(bob), policy={"rpm": 5, "max_ttl": "30m"})
    grant_update(grant=grant_of(bob), policy={"rpm": 5})  # the same again: nothing changed
    (event,) = AuditEvent.objects.filter(action="grant.updated")
    assert event.detail == {"policy": {"rpm": 5, "max_ttl": 1800}}
    assert (event.agent, event.backend) == ("bob", "anthropic")


BAD_INPUT = [
    ({"models": ["claude-[haiku"]}, "models: 'claude-[haiku' has a [ that is never closed"),
    ({"models": ["claude haiku"]}, "holds characters no model or path has"),
    ({"models": ["claude-]-x"]}, "has a ] without its ["),
    ({"models": ["claude-[]"]}, "has an empty [] class"),
    ({"models": [""]}, "models: a pattern must not be empty"),
    ({"models": "claude-*"}, "models: give a list of glob patterns"),
    ({"paths": ["v1/messages*"]}, "paths: 'v1/messages*' must start with /"),
    ({"rpm": -1}, "rpm: must be at least 1, not -1"),
    ({"tpm": 0}, "tpm: must be at least 1, not 0"),
    ({"daily_tokens": -500}, "daily_tokens: must be at least 1, not -500"),
    ({"max_tokens": True}, "max_tokens: must be a whole number"),
    ({"max_concurrent": 0}, "max_concurrent: must be at least 1, not 0"),
    ({"max_concurrent": 10_001}, "max_concurrent: must be at most 10,000"),
    ({"max_concurrent": "4"}, "max_concurrent: must be a whole number"),
    ({"rpm": 10**9}, "rpm: must be at most 1,000,000"),
    ({"max_ttl": "2h"}, "max_ttl: 2h is above backend anthropic's bound of 1h"),
    ({"max_ttl": "10s"}, "max_ttl: 10s is below backend anthropic's shortest token of 1m"),
    ({"max_ttl": "soon"}, "max_ttl: 'soon' is not a duration"),
    ({"daily_usd": "-1"}, "daily_usd: must be more than 0, not -1"),
    ({"daily_usd": "0"}, "daily_usd: must be more than 0, not 0"),
    ({"daily_usd": "lots"}, "daily_usd: 'lots' is not an amount in US dollars"),
    ({"daily_usd": "NaN"}, 'daily_usd: must be an amount in US dollars, such as "25.00"'),
    ({"daily_usd": float("nan")}, 'daily_usd: must be an amount in US dollars, such as "25.00"'),
    ({"monthly_usd": "Infinity"}, "monthly_usd: must be an amount in US dollars"),
    ({"monthly_usd": "1000000.01"}, "monthly_usd: must be at most 1,000,000 USD"),
    ({"monthly_usd": 10**7}, "monthly_usd: must be at most 1,000,000 USD"),
    ({"monthly_usd": "1e400"}, "monthly_usd: must be at most 1,000,000 USD"),
    ({"monthly_usd": "0.0000001"}, "monthly_usd: has at most 6 decimal places"),
    ({"monthly_usd": True}, "monthly_usd: must be an amount in US dollars"),
    ({"monthly_usd": ["5"]}, "monthly_usd: must be an amount in US dollars"),
    ({"budget": 5}, "unknown policy field: budget"),
]


@pytest.mark.parametrize(("policy", "message"), BAD_INPUT)
def test_bad_input_is_refused_clearly_and_nothing_is_saved(
    bob: Agent, policy: dict[str, Any], message: str
) -> None:
    before = grant_values(grant_of(bob))
    with pytest.raises(ServiceError) as refused:
        # One good field along with the bad one: it must not be saved either.
        grant_update(grant=grant_of(bob), policy={"rpm": 7, **policy})
    assert message in refused.value.message
    assert grant_values(grant_of(bob)) == before
    assert not AuditEvent.objects.filter(action="grant.updated").exists()


def test_every_problem_is_named_at_once(bob: Agent) -> None:
    with pytest.raises(ServiceError) as refused:
        grant_update(grant=grant_of(bob), policy={"rpm": -1, "paths": ["v1"], "max_ttl": "9h"})
    assert refused.value.message.count(";") == 2


def test_a_bad_policy_on_a_new_grant_grants_nothing(bob: Agent, staging: Backend) -> None:
    with pytest.raises(ServiceError):
        grant_set(agent=bob, backend=staging, policy={"rpm": -3})
    assert not Grant.objects.filter(agent=bob, backend=staging).exists()
    assert not AuditEvent.objects.filter(action="grant.added", backend=staging.name).exists()


def test_a_backend_has_no_max_ttl_default_of_its_own(anthropic: Backend) -> None:
    with pytest.raises(ServiceError) as refused:
        backend_policy_update(backend=anthropic, policy={"max_ttl": "30m"})
    assert "token TTL max" in refused.value.message


def test_the_grants_max_ttl_lowers_what_can_be_minted(bob: Agent) -> None:
    grant_update(grant=grant_of(bob), policy={"max_ttl": "5m"})
    assert token_issue(agent=bob, backend_name="anthropic").token.ttl_seconds == 300
    with pytest.raises(ServiceError) as refused:
        token_issue(agent=bob, backend_name="anthropic", ttl="30m")
    assert refused.value.message == (
        "ttl: 30m is outside the bounds of this grant on backend anthropic: 1m to 5m"
    )


def test_the_cli_grants_with_a_policy_and_lists_it(bob: Agent, staging: Backend) -> None:
    manage("agent", "defaults", "anthropic", "--tpm", "20000")
    said = manage(
        "agent", "grant", "bob", "anthropic-staging",
        "--models", "claude-haiku-*,claude-sonnet-4-*", "--paths", "/v1/messages*",
        "--rpm", "60", "--daily-tokens", "1000000", "--max-tokens", "4096", "--max-ttl", "30m",
        "--max-concurrent", "8", "--daily-usd", "25", "--monthly-usd", "$300.5",
    )  # fmt: skip
    assert said.startswith("bob may now mint tokens for anthropic-staging; policy: models ")
    policy = grant_policy(grant_of(bob, "anthropic-staging"))
    assert policy.models == ("claude-haiku-*", "claude-sonnet-4-*")
    assert (policy.paths, policy.rpm, policy.max_tokens, policy.max_ttl) == (
        ("/v1/messages*",), 60, 4096, 1800,
    )  # fmt: skip
    assert policy.max_concurrent == 8
    assert (policy.daily_usd, policy.monthly_usd) == (Decimal("25"), Decimal("300.5"))

    listed = manage("agent", "grants", "bob").splitlines()
    assert listed[0].split() == [
        "BACKEND", "MODELS", "PATHS", "RPM", "TPM", "DAILY", "TOKENS", "DAILY", "USD", "MONTHLY",
        "USD", "MAX", "TOKENS", "MAX", "CONCURRENT", "MAX", "TTL", "HOLD", "GRANTED",
    ]  # fmt: skip
    anthropic_row, staging_row = listed[1].split(), listed[2].split()
    assert anthropic_row[:6] == ["anthropic", "-", "-", "-", "20000", "(backend)"]
    assert staging_row[:11] == [
        "anthropic-staging", "claude-haiku-*,claude-sonnet-4-*", "/v1/messages*", "60", "-",
        "1000000", "$25.00", "$300.50", "4096", "8", "30m",
    ]  # fmt: skip

    manage("agent", "grant", "bob", "anthropic-staging", "--rpm", "default")
    assert grant_policy(grant_of(bob, "anthropic-staging")).rpm is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rpm", "-1"], "rpm: must be at least 1, not -1"),
        (["--rpm", "lots"], "rpm: 'lots' is not a whole number"),
        (["--models", "claude-[haiku"], "has a [ that is never closed"),
        (["--max-ttl", "2h"], "max_ttl: 2h is above backend anthropic-staging's bound of 1h"),
        (["--max-concurrent", "0"], "max_concurrent: must be at least 1, not 0"),
        (["--max-concurrent", "20000"], "max_concurrent: must be at most 10,000"),
        (["--max-concurrent", "many"], "max_concurrent: 'many' is not a whole number"),
        (["--daily-usd", "-5"], "daily_usd: must be more than 0, not -5"),
        (["--monthly-usd", "lots"], "monthly_usd: 'lots' is not an amount in US dollars"),
    ],
)
def test_the_cli_refuses_bad_flags_and_grants_nothing(
    bob: Agent, staging: Backend, flags: list[str], message: str
) -> None:
    with pytest.raises(CommandError) as refused:
        manage("agent", "grant", "bob", "anthropic-staging", *flags)
    assert message in str(refused.value)
    assert not Grant.objects.filter(agent=bob, backend=staging).exists()


def test_max_concurrent_is_inherited_from_the_backend_unless_the_grant_sets_it(
    bob: Agent, anthropic: Backend
) -> None:
    assert grant_policy(grant_of(bob)).max_concurrent is None  # no default: no limit
    backend_policy_update(backend=anthropic, policy={"max_concurrent": 4})
    assert grant_policy(grant_of(bob)).max_concurrent == 4
    grant_update(grant=grant_of(bob), policy={"max_concurrent": 2})
    assert grant_policy(grant_of(bob)).max_concurrent == 2
    grant_update(grant=grant_of(bob), policy={"max_concurrent": None})
    assert grant_policy(grant_of(bob)).max_concurrent == 4
    # Held in the process, not counted in Redis: it alone does not make a call counted.
    assert not grant_policy(grant_of(bob)).counted


def test_the_cli_sets_a_backends_max_concurrent_default(bob: Agent, anthropic: Backend) -> None:
    said = manage("agent", "defaults", "anthropic", "--max-concurrent", "16")
    assert "max_concurrent 16" in said
    assert grant_policy(grant_of(bob)).max_concurrent == 16
    listed = manage("agent", "grants", "bob").splitlines()
    assert "16 (backend)" in listed[1]
    manage("agent", "defaults", "anthropic", "--max-concurrent", "default")
    assert grant_policy(grant_of(bob)).max_concurrent is None
    with pytest.raises(CommandError) as refused:
        manage("agent", "defaults", "anthropic", "--max-concurrent", "-2")
    assert "max_concurrent: must be at least 1, not -2" in str(refused.value)
