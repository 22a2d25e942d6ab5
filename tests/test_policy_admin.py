"""Policy in the admin: alice edits bob's grant inline on his agent page; vera, who may only
look, sees it but cannot change it."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.test import Client

from broker.models import Agent, Backend, Grant
from broker.services.agents import agent_enroll
from broker.services.policy import backend_policy_update, grant_values

pytestmark = pytest.mark.django_db


@pytest.fixture
def bob(anthropic: Backend, alice: AbstractBaseUser) -> Agent:
    return agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent


@pytest.fixture
def admin_client(alice: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(alice)
    return client


def page(agent: Agent) -> str:
    return f"/admin/broker/agent/{agent.pk}/change/"


def policy_url(agent: Agent) -> str:
    grant = Grant.objects.get(agent=agent)
    return f"/admin/broker/agent/{agent.pk}/grants/{grant.pk}/policy/"


def form_data(agent: Agent, **values: str) -> dict[str, str]:
    grant = Grant.objects.get(agent=agent)
    fields = [
        "models", "paths", "rpm", "tpm", "daily_tokens", "daily_usd", "monthly_usd", "max_tokens",
        "max_concurrent", "max_ttl",
    ]  # fmt: skip
    return {f"policy-{grant.pk}-{name}": values.get(name, "") for name in fields}


def test_the_agent_page_shows_each_grant_with_the_backends_defaults(
    admin_client: Client, bob: Agent, anthropic: Backend
) -> None:
    backend_policy_update(backend=anthropic, policy={"rpm": 60})
    html = admin_client.get(page(bob)).content.decode()
    assert 'id="kb-policy-anthropic"' in html
    assert 'placeholder="60"' in html  # what a blank rpm means here
    assert 'placeholder="1h"' in html  # the backend's TTL bound
    assert 'placeholder="none"' in html  # no default: no limit
    assert 'class="button kb-save-policy"' in html


def test_alice_saves_a_policy_inline(admin_client: Client, bob: Agent) -> None:
    data = form_data(bob, models="claude-haiku-*, claude-sonnet-4-*", rpm="3", max_ttl="30m")
    response = admin_client.post(policy_url(bob), {**data, "next": page(bob)}, follow=True)
    assert "Policy of bob → anthropic saved" in response.content.decode()
    own = grant_values(Grant.objects.get(agent=bob))
    assert own["models"] == ["claude-haiku-*", "claude-sonnet-4-*"]
    assert (own["rpm"], own["max_ttl"], own["tpm"]) == (3, 1800, None)
    html = admin_client.get(page(bob)).content.decode()
    assert 'value="claude-haiku-*,claude-sonnet-4-*"' in html
    assert 'value="30m"' in html


def test_bad_input_in_the_admin_says_why_and_saves_nothing(
    admin_client: Client, bob: Agent
) -> None:
    data = form_data(bob, rpm="-1", models="claude-[haiku")
    response = admin_client.post(policy_url(bob), {**data, "next": page(bob)}, follow=True)
    html = response.content.decode()
    assert "rpm: must be at least 1, not -1" in html
    assert "Nothing was saved" in html
    assert all(value is None for value in grant_values(Grant.objects.get(agent=bob)).values())


def test_staff_who_may_only_look_cannot_change_a_policy(bob: Agent) -> None:
    vera = get_user_model().objects.create_user("vera", password="vera-pw-123", is_staff=True)
    vera.user_permissions.add(Permission.objects.get(codename="view_agent"))
    client = Client()
    client.force_login(vera)
    html = client.get(page(bob)).content.decode()
    assert 'id="kb-policy-anthropic"' in html
    assert 'class="button kb-save-policy"' not in html
    assert client.post(policy_url(bob), form_data(bob, rpm="1")).status_code == 403
    assert grant_values(Grant.objects.get(agent=bob))["rpm"] is None


def test_a_get_on_the_policy_url_changes_nothing(admin_client: Client, bob: Agent) -> None:
    assert admin_client.get(policy_url(bob)).status_code == 405


def test_max_concurrent_in_the_admin_set_inherited_and_checked(
    admin_client: Client, bob: Agent, anthropic: Backend
) -> None:
    backend_policy_update(backend=anthropic, policy={"max_concurrent": 12})
    html = admin_client.get(page(bob)).content.decode()
    grant = Grant.objects.get(agent=bob)
    assert f'name="policy-{grant.pk}-max_concurrent"' in html
    assert 'placeholder="12"' in html  # what a blank max_concurrent means here

    data = form_data(bob, max_concurrent="5")
    admin_client.post(policy_url(bob), {**data, "next": page(bob)}, follow=True)
    assert grant_values(Grant.objects.get(agent=bob))["max_concurrent"] == 5

    data = form_data(bob, max_concurrent="10001")
    response = admin_client.post(policy_url(bob), {**data, "next": page(bob)}, follow=True)
    assert "max_concurrent: must be at most 10,000" in response.content.decode()
    assert grant_values(Grant.objects.get(agent=bob))["max_concurrent"] == 5

    data = form_data(bob, max_concurrent="default")
    admin_client.post(policy_url(bob), {**data, "next": page(bob)}, follow=True)
    assert grant_values(Grant.objects.get(agent=bob))["max_concurrent"] is None


def test_usd_budgets_in_the_admin_set_inherited_and_checked(
    admin_client: Client, bob: Agent, anthropic: Backend
) -> None:
    backend_policy_update(backend=anthropic, policy={"monthly_usd": "300"})
    html = admin_client.get(page(bob)).content.decode()
    grant = Grant.objects.get(agent=bob)
    assert f'name="policy-{grant.pk}-daily_usd"' in html
    assert 'placeholder="300.00"' in html  # what a blank monthly_usd means here

    data = form_data(bob, daily_usd="12.5")
    admin_client.post(policy_url(bob), {**data, "next": page(bob)}, follow=True)
    assert grant_values(Grant.objects.get(agent=bob))["daily_usd"] == Decimal("12.5")
    assert 'value="12.50"' in admin_client.get(page(bob)).content.decode()

    data = form_data(bob, daily_usd="12.5", monthly_usd="NaN")
    response = admin_client.post(policy_url(bob), {**data, "next": page(bob)}, follow=True)
    assert "monthly_usd: must be an amount in US dollars" in response.content.decode()
    assert grant_values(Grant.objects.get(agent=bob))["monthly_usd"] is None


def test_a_hold_rule_in_the_admin_set_shown_and_checked(admin_client: Client, bob: Agent) -> None:
    grant = Grant.objects.get(agent=bob)
    field = f"policy-{grant.pk}-hold"
    rule = "models=claude-opus-*; max_tokens_above=4000; timeout=5m"
    data = {**form_data(bob), field: rule, "next": page(bob)}
    assert "saved" in admin_client.post(policy_url(bob), data, follow=True).content.decode()
    assert grant_values(Grant.objects.get(agent=bob))["hold"] == {
        "all": False, "models": ["claude-opus-*"], "paths": [], "max_tokens_above": 4000,
        "timeout": 300,
    }  # fmt: skip
    assert f'value="{rule}"' in admin_client.get(page(bob)).content.decode()

    data = {**form_data(bob), field: "all; timeout=3h", "next": page(bob)}
    html = admin_client.post(policy_url(bob), data, follow=True).content.decode()
    assert "hold: timeout: must be 5s to 1h, not 3h" in html
    assert "Nothing was saved" in html
    assert grant_values(Grant.objects.get(agent=bob))["hold"]["timeout"] == 300
