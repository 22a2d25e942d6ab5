"""keybroker as the identity provider of Anthropic's workload identity federation, end to end:
`keybroker identity-token` writes a JWT, the official SDK's WorkloadIdentityCredentials
exchanges it at a relying party (the fake) that fetches keybroker's discovery document and
JWKS over HTTP, and the call goes through with the access token it got."""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anthropic
import jwt as pyjwt
import pytest
from anthropic.lib.credentials import (
    IdentityTokenFile,
    WorkloadIdentityCredentials,
    WorkloadIdentityError,
    exchange_federation_assertion,
)
from django.conf import settings as django_settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from broker.models import Agent, OidcClient, SigningKey
from broker.services.agents import agent_enroll
from broker.services.identity import identity_grant
from broker.services.oidc import oidc_client_create, signing_key_current
from tests.conftest import REPO, clean_env
from tests.fake_anthropic import FakeAnthropic
from tests.wif import ORGANIZATION, SERVICE_ACCOUNT, trust_keybroker

pytestmark = pytest.mark.django_db(transaction=True)

ANTHROPIC = "https://api.anthropic.com"
HELLO = {"role": "user", "content": "Hello"}


@dataclass(frozen=True)
class Workload:
    agent: Agent
    rule_id: str
    config: Path


@pytest.fixture
def workload(
    live_url: str,
    fake_anthropic: FakeAnthropic,
    alice: AbstractBaseUser,
    settings: Any,
    tmp_path: Path,
) -> Workload:
    """bob, approved and allowed identity tokens for Anthropic; the console trusts keybroker
    as an issuer with a rule for bob's id; bob's `keybroker` config is in place."""
    settings.PUBLIC_URL = live_url  # the issuer, as the relying party will fetch it
    enrolled = agent_enroll(name="bob", scopes=[], approved_by=alice)
    identity_grant(agent=enrolled.agent, audience=ANTHROPIC)
    rule_id = trust_keybroker(fake_anthropic, live_url, subject=str(enrolled.agent.pk))
    config = tmp_path / "keybroker.json"
    config.write_text(
        json.dumps(
            {
                "url": live_url,
                "name": "bob",
                "agent_id": str(enrolled.agent.pk),
                "vend_token": enrolled.vend_token,
            }
        )
    )
    config.chmod(0o600)
    return Workload(enrolled.agent, rule_id, config)


def keybroker(workload: Workload, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keybroker.cli", "--config", str(workload.config), *args],
        env=clean_env(HOME=str(workload.config.parent)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_official_sdk_exchanges_an_identity_token_from_keybroker(
    workload: Workload,
    fake_anthropic: FakeAnthropic,
    live_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token_file = tmp_path / "identity.jwt"
    written = keybroker(
        workload, "identity-token", "--audience", ANTHROPIC, "--out", str(token_file)
    )
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    jwt = token_file.read_text().strip()
    assert jwt not in written.stderr
    assert "wrote an identity token for https://api.anthropic.com" in written.stderr
    config = json.loads(workload.config.read_text())
    assert config["client_secret"].startswith("cks_")  # created on first use, kept private
    assert stat.S_IMODE(workload.config.stat().st_mode) == 0o600

    credentials = WorkloadIdentityCredentials(
        identity_token_provider=IdentityTokenFile(token_file),
        federation_rule_id=workload.rule_id,
        organization_id=ORGANIZATION,
        service_account_id=SERVICE_ACCOUNT,
    )
    client = anthropic.Anthropic(base_url=fake_anthropic.url, credentials=credentials)
    reply = client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[HELLO])
    assert reply.content[0].text == "Hello from the fake."  # type: ignore[union-attr]

    [exchange] = fake_anthropic.exchanges
    assert exchange.claims["iss"] == live_url
    assert exchange.claims["sub"] == str(workload.agent.pk)
    assert exchange.claims["aud"] == ANTHROPIC
    assert exchange.claims["exp"] - exchange.claims["iat"] == 600
    [call] = [r for r in fake_anthropic.requests if r.path == "/v1/messages"]
    assert call.headers["authorization"] == f"Bearer {exchange.access_token}"

    # The variables the SDK reads on its own, with a fresh token: keybroker's JWTs are
    # single-use at Anthropic (each has its own jti), so a new process needs a new one.
    again = keybroker(workload, "identity-token", "--audience", ANTHROPIC, "--out", str(token_file))
    assert again.returncode == 0, again.stderr
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "no-profiles"))
    monkeypatch.setenv("ANTHROPIC_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("ANTHROPIC_FEDERATION_RULE_ID", workload.rule_id)
    monkeypatch.setenv("ANTHROPIC_ORGANIZATION_ID", ORGANIZATION)
    monkeypatch.setenv("ANTHROPIC_SERVICE_ACCOUNT_ID", SERVICE_ACCOUNT)
    models = anthropic.Anthropic(base_url=fake_anthropic.url).models.list()
    assert len(models.data) == 2
    assert len(fake_anthropic.exchanges) == 2
    listed = fake_anthropic.requests[-1]
    assert (listed.path, listed.headers["authorization"]) == (
        "/v1/models",
        f"Bearer {fake_anthropic.exchanges[1].access_token}",
    )
    assert OidcClient.objects.count() == 1  # the client credentials were reused


def _token(credentials: dict[str, str], audience: str) -> str:
    form = {"grant_type": "client_credentials", "audience": audience, **credentials}
    response = Client().post(
        "/oauth/token", urlencode(form), content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 200, response.content
    return str(response.json()["access_token"])


def test_the_relying_party_refuses_a_wrong_audience_an_expired_jwt_and_a_rotated_out_key(
    workload: Workload, fake_anthropic: FakeAnthropic
) -> None:
    issued = oidc_client_create(agent=workload.agent)
    credentials = {"client_id": issued.client.client_id, "client_secret": issued.client_secret}

    def exchange(assertion: str) -> str:
        return exchange_federation_assertion(
            assertion=assertion,
            federation_rule_id=workload.rule_id,
            organization_id=ORGANIZATION,
            service_account_id=SERVICE_ACCOUNT,
            base_url=fake_anthropic.url,
        ).token

    def refused(assertion: str) -> str:
        with pytest.raises(WorkloadIdentityError) as caught:
            exchange(assertion)
        assert caught.value.status_code == 401
        assert assertion not in str(caught.value)
        return fake_anthropic.exchange_refusals[-1]

    good, spare, doomed = (_token(credentials, ANTHROPIC) for _ in range(3))
    assert exchange(good).startswith("sk-ant-oat01-")
    assert refused(good) == "jti was already used (replay)"

    identity_grant(agent=workload.agent, audience="https://other.example")
    assert refused(_token(credentials, "https://other.example")) == (
        "claims: invalid_claim: Invalid claim: 'aud'"
    )

    claims = pyjwt.decode(spare, options={"verify_signature": False})
    key = signing_key_current()
    past = int(time.time()) - 7200
    expired = pyjwt.encode(
        {**claims, "iat": past, "nbf": past, "exp": past + 600, "jti": "expired-1"},
        key.private_pem,
        algorithm=key.algorithm,
        headers={"kid": key.kid},
    )
    assert refused(expired).startswith("claims: expired_token")

    # Rotated: the old key stays published while JWTs it signed may still be alive...
    call_command("oidc", "rotate-key", stdout=io.StringIO())
    assert exchange(spare).startswith("sk-ant-oat01-")
    # ...and once that window has passed it is gone, and so is trust in what it signed.
    window = timedelta(seconds=django_settings.OIDC_TOKEN_LIFETIME_SECONDS + 61)
    SigningKey.objects.filter(kid=key.kid).update(retired_at=timezone.now() - window)
    assert refused(doomed) == f"signature: invalid_key_id: No key for kid: '{key.kid}'"
    assert exchange(_token(credentials, ANTHROPIC)).startswith("sk-ant-oat01-")  # the new key
