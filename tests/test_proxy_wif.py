"""A federated backend through the proxy: no stored key anywhere; keybroker exchanges its own
JWT at the (fake) upstream for an access token, shares it, refreshes it, and calls with it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import anthropic
import httpx
import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import Client

from audit.models import AuditEvent
from broker.infra.redis import redis_client, redis_key
from broker.models import Backend
from broker.services import federation
from broker.services.federation import federation_of, federation_token
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import audit_drained
from tests.wif import ORGANIZATION, SERVICE_ACCOUNT, WORKSPACE, Federated

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = {"role": "user", "content": "Hello"}


def bearer_of(seen: Any) -> str:
    return str(seen.headers["authorization"]).removeprefix("Bearer ")


def test_the_sdk_calls_through_the_proxy_with_the_exchanged_access_token(
    federated: Federated, fake_anthropic: FakeAnthropic, live_url: str
) -> None:
    client = anthropic.Anthropic(base_url=federated.base_url, auth_token=federated.token)
    reply = client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[HELLO])
    assert reply.content[0].text == "Hello from the fake."  # type: ignore[union-attr]

    [exchange] = fake_anthropic.exchanges
    # keybroker's JWT, as the fake verified it against keybroker's own JWKS over HTTP.
    assert exchange.claims["iss"] == live_url
    assert exchange.claims["sub"] == "backend:wif"
    assert exchange.claims["aud"] == "https://api.anthropic.com"
    assert exchange.header["alg"] == settings.OIDC_SIGNING_ALGORITHM
    assert exchange.request == {
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "federation_rule_id": federated.rule_id,
        "organization_id": ORGANIZATION,
        "service_account_id": SERVICE_ACCOUNT,
        "workspace_id": WORKSPACE,
    }
    assert exchange.headers["anthropic-beta"] == "oauth-2025-04-20,oidc-federation-2026-04-01"

    [call] = [r for r in fake_anthropic.requests if r.path == "/v1/messages"]
    assert call.headers["authorization"] == f"Bearer {exchange.access_token}"
    assert "oauth-2025-04-20" in call.headers["anthropic-beta"].split(",")
    assert "x-api-key" not in call.headers
    assert federated.token not in json.dumps(call.headers)
    # No key was ever stored for it.
    assert Backend.objects.get(name="wif").secret == ""


def test_200_concurrent_calls_make_exactly_one_exchange(
    federated: Federated, fake_anthropic: FakeAnthropic
) -> None:
    # A slow token endpoint, so the calls pile up behind the one exchange in flight.
    fake_anthropic.exchange_delay = 0.5

    async def storm() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            calls = [
                http.get(f"{federated.base_url}/v1/models", headers={"x-api-key": federated.token})
                for _ in range(200)
            ]
            return [response.status_code for response in await asyncio.gather(*calls)]

    assert asyncio.run(storm()) == [200] * 200
    assert len(fake_anthropic.exchanges) == 1
    token = fake_anthropic.exchanges[0].access_token
    models = [r for r in fake_anthropic.requests if r.path == "/v1/models"]
    assert len(models) == 200
    assert {bearer_of(r) for r in models} == {token}
    audit_drained()
    assert AuditEvent.objects.filter(action="backend.token_exchanged").count() == 1


def test_a_token_near_its_expiry_is_refreshed_before_it_is_used(
    federated: Federated, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    http = httpx.Client(base_url=federated.base_url, headers={"x-api-key": federated.token})
    assert http.get("/v1/models").status_code == 200
    [first] = fake_anthropic.exchanges
    assert http.get("/v1/models").status_code == 200
    assert len(fake_anthropic.exchanges) == 1  # fresh: used again, from memory

    # 55 minutes on, the hour-long token has 5 minutes left: inside its refresh margin
    # (a tenth of its lifetime), though not expired. The next call must not use it.
    real_clock = federation.clock
    monkeypatch.setattr(federation, "clock", lambda: real_clock() + 3300)
    assert http.get("/v1/models").status_code == 200

    assert len(fake_anthropic.exchanges) == 2
    second = fake_anthropic.exchanges[1]
    assert second.access_token != first.access_token
    assert second.claims["jti"] != first.claims["jti"]  # a new JWT for each exchange
    last = [r for r in fake_anthropic.requests if r.path == "/v1/models"][-1]
    assert bearer_of(last) == second.access_token


def test_the_token_is_shared_across_processes_and_encrypted_in_redis(
    federated: Federated, fake_anthropic: FakeAnthropic
) -> None:
    http = httpx.Client(base_url=federated.base_url, headers={"x-api-key": federated.token})
    assert http.get("/v1/models").status_code == 200
    [exchange] = fake_anthropic.exchanges

    # Another process (this thread, with none of the proxy's memory) gets the same token.
    shared = federation_token(federation_of(Backend.objects.get(name="wif")))  # type: ignore[arg-type]
    assert shared.token == exchange.access_token
    assert len(fake_anthropic.exchanges) == 1
    keys = list(redis_client().scan_iter(redis_key("federation", "token", "*")))
    assert len(keys) == 1
    stored = redis_client().get(keys[0])
    assert stored
    assert exchange.access_token.encode() not in stored
    assert exchange.access_token[13:40].encode() not in stored


def test_a_token_the_upstream_refuses_is_dropped_and_exchanged_anew(
    federated: Federated, fake_anthropic: FakeAnthropic
) -> None:
    http = httpx.Client(base_url=federated.base_url, headers={"x-api-key": federated.token})
    assert http.get("/v1/models").status_code == 200
    [first] = fake_anthropic.exchanges
    fake_anthropic.valid_keys.discard(first.access_token)  # revoked upstream

    assert http.get("/v1/models").status_code == 401  # the upstream's own answer, passed on
    assert http.get("/v1/models").status_code == 200
    assert len(fake_anthropic.exchanges) == 2
    last = [r for r in fake_anthropic.requests if r.path == "/v1/models"][-1]
    assert bearer_of(last) == fake_anthropic.exchanges[1].access_token


def test_the_next_call_after_a_refusal_waits_for_the_shared_cache_to_drop_the_token(
    federated: Federated, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refused token leaves the shared cache in the background; a call right behind the
    401 must not be handed it back from there (a CI run saw exactly that)."""
    import proxy.federation

    forget = proxy.federation._federation_forget

    async def slow_forget(*args: Any) -> None:
        await asyncio.sleep(0.5)
        await forget(*args)

    monkeypatch.setattr(proxy.federation, "_federation_forget", slow_forget)
    http = httpx.Client(base_url=federated.base_url, headers={"x-api-key": federated.token})
    assert http.get("/v1/models").status_code == 200
    fake_anthropic.valid_keys.discard(fake_anthropic.exchanges[0].access_token)
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models").status_code == 200
    assert len(fake_anthropic.exchanges) == 2


def test_a_refused_exchange_is_a_502_naming_the_backend_and_leaking_nothing(
    federated: Federated, fake_anthropic: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_anthropic.federation_rules.clear()  # the rule was deleted in the console
    http = httpx.Client(base_url=federated.base_url, headers={"x-api-key": federated.token})
    answers = [http.get("/v1/models") for _ in range(3)]

    assert [a.status_code for a in answers] == [502, 502, 502]
    error = answers[0].json()["error"]
    assert error["type"] == "api_error"
    assert error["message"] == (
        "backend wif: token exchange refused: upstream answered 401 "
        "(invalid_grant: no such federation rule in this organization)"
    )
    # The failure is remembered for a moment: three calls, one attempt upstream.
    assert len(fake_anthropic.exchange_refusals) == 1
    assert not [r for r in fake_anthropic.requests if r.path == "/v1/models"]
    audit_drained()
    failed = AuditEvent.objects.get(action="backend.token_exchange_failed")
    assert failed.backend == "wif"
    assert failed.detail["subject"] == "backend:wif"
    calls = AuditEvent.objects.filter(action="proxy.request", backend="wif")
    assert {(c.status, c.outcome) for c in calls} == {(502, "upstream_unreachable")}

    # The JWT keybroker sent went nowhere but the token endpoint.
    [attempt] = [r for r in fake_anthropic.requests if r.path == "/v1/oauth/token"]
    assertion = json.loads(attempt.body)["assertion"]
    logs = "\n".join(r.getMessage() for r in caplog.records)
    rows = json.dumps(list(AuditEvent.objects.values()), default=str)
    for blob in [*(a.text for a in answers), logs, rows]:
        assert assertion not in blob
        assert assertion.split(".")[2] not in blob


def test_no_surface_shows_the_access_token_or_the_assertion(
    federated: Federated,
    fake_anthropic: FakeAnthropic,
    admin_api: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = anthropic.Anthropic(base_url=federated.base_url, auth_token=federated.token)
    client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[HELLO])
    stream = client.messages.create(
        model="claude-haiku-4-5", max_tokens=8, messages=[HELLO], stream=True
    )
    assert sum(1 for _ in stream) > 3
    [exchange] = fake_anthropic.exchanges
    [attempt] = [r for r in fake_anthropic.requests if r.path == "/v1/oauth/token"]
    assertion = json.loads(attempt.body)["assertion"]

    seen = [
        admin_api.get("/v1/admin/backends/wif").content,
        admin_api.post("/v1/admin/backends/wif/validate").content,  # uses the shared token
        admin_api.get("/v1/admin/audit/").content,
    ]
    out = io.StringIO()
    call_command("backend", "inspect", "wif", "--json", stdout=out)
    call_command("audit", "--json", stdout=out)
    seen.append(out.getvalue().encode())
    audit_drained()
    rows = json.dumps(list(AuditEvent.objects.values()), default=str).encode()
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()

    assert b"workload identity" in seen[0]
    assert b'"state":"valid"' in seen[1]
    assert AuditEvent.objects.filter(action="proxy.request", backend="wif").count() == 2
    for secret in (exchange.access_token, assertion):
        for blob in [*seen, rows, logs]:
            assert secret.encode() not in blob
            assert secret[-30:].encode() not in blob
