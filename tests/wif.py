"""Workload identity cast: the fake upstream trusting keybroker as an issuer, and a federated
(``anthropic-wif``) backend that exchanges keybroker's JWT for its access tokens."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser

from broker.models import Backend
from broker.services.agents import agent_enroll
from broker.services.backends import FederationSettings, backend_add
from broker.services.tokens import token_issue
from tests.fake_anthropic import FakeAnthropic, FederationRule
from tests.proxy_cast import audit_drained

ORGANIZATION = "6f1c2a4e-1b7d-4c3e-9a2f-0d5e8b7c6a91"
SERVICE_ACCOUNT = "svac_01KeyBrokerTests"
WORKSPACE = "wrkspc_01KeyBrokerTests"


def new_rule_id() -> str:
    # A rule of its own per test: the proxy keeps access tokens per process, keyed by the
    # federation settings, so no test can meet another's token.
    return f"fdrl_{secrets.token_hex(8)}"


def trust_keybroker(fake: FakeAnthropic, issuer: str, *, subject: str | None) -> str:
    """What an admin sets up in the Claude Console: an issuer and a rule. Returns the rule id."""
    rule_id = new_rule_id()
    fake.federation_rules[rule_id] = FederationRule(
        issuer=issuer,
        organization_id=ORGANIZATION,
        subject=subject,
        service_account_id=SERVICE_ACCOUNT,
    )
    return rule_id


def wif_backend_add(fake: FakeAnthropic, rule_id: str, name: str = "wif") -> Backend:
    return backend_add(
        name=name,
        kind="anthropic-wif",
        base_url=fake.url,
        federation=FederationSettings(
            federation_rule_id=rule_id,
            organization_id=ORGANIZATION,
            service_account_id=SERVICE_ACCOUNT,
            workspace_id=WORKSPACE,
        ),
    )


@dataclass(frozen=True)
class Federated:
    base_url: str  # {live_url}/v1/proxy/wif
    token: str  # bob's crd_ token for it
    backend: Backend
    rule_id: str


@pytest.fixture
def federated(
    live_url: str, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser, settings: Any
) -> Iterator[Federated]:
    """A federated backend ``wif`` through the live server; the fake trusts keybroker's JWTs
    whose ``sub`` is ``backend:wif``. Needs ``transactional_db``."""
    settings.PUBLIC_URL = live_url  # the issuer the fake fetches discovery and JWKS from
    rule_id = trust_keybroker(fake_anthropic, live_url, subject="backend:wif")
    backend = wif_backend_add(fake_anthropic, rule_id)
    agent = agent_enroll(name="bob", scopes=["wif"], approved_by=alice).agent
    issued = token_issue(agent=agent, backend_name="wif", ttl="30m")
    yield Federated(f"{live_url}/v1/proxy/wif", issued.plaintext, backend, rule_id)
    audit_drained()
