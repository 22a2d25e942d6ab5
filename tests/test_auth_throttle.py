"""Failed authentication is throttled per address and per client id, and audited with a cap
(issue 19, item 13)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client, override_settings

from audit.models import AuditEvent
from broker.models import Backend
from tests.agents import as_agent, enroll, send
from tests.test_oidc import form_post

pytestmark = pytest.mark.django_db

ELSEWHERE = "10.0.0.2"


def token_form(client_id: str, secret: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}


@override_settings(AUTH_CLIENT_FAILURE_RATE="5/5m", AUTH_FAILURE_RATE="100/5m")
def test_bad_client_secrets_are_throttled_per_client_id_even_the_right_one_after(
    client_credentials: dict[str, Any],
) -> None:
    client_id, secret = client_credentials["client_id"], client_credentials["client_secret"]
    for _ in range(5):
        assert form_post(Client(), token_form(client_id, "cks_wrong")).status_code == 401
    throttled = form_post(Client(), token_form(client_id, "cks_wrong"))
    assert throttled.status_code == 429, throttled.content
    assert throttled.json()["error"] == "slow_down"
    assert 1 <= int(throttled["Retry-After"]) <= 300
    # While throttled the right secret is refused as well, from this address ...
    assert form_post(Client(), token_form(client_id, secret)).status_code == 429
    # ... but not from another one: nobody can lock a real client out by failing with its id.
    assert (
        form_post(Client(REMOTE_ADDR=ELSEWHERE), token_form(client_id, secret)).status_code == 200
    )
    # Another client id from the throttled address is counted on its own.
    assert form_post(Client(), token_form("other", "cks_wrong")).status_code == 401


@override_settings(AUTH_FAILURE_RATE="20/5m", AUTH_CLIENT_FAILURE_RATE="100/5m")
def test_an_address_failing_with_many_client_ids_and_vend_tokens_is_throttled(
    client_credentials: dict[str, Any],
) -> None:
    for n in range(10):
        assert form_post(Client(), token_form(f"client{n}", "cks_wrong")).status_code == 401
    for n in range(10):
        assert as_agent(f"ckr_wrong{n}").get("/v1/enroll/status").status_code == 401
    # Every attempt from the address is refused now, right credentials included.
    refused = as_agent("ckr_wrong").get("/v1/enroll/status")
    assert refused.status_code == 429, refused.content
    assert refused.json()["error"]["type"] == "rate_limited"
    assert int(refused["Retry-After"]) >= 1
    right = token_form(client_credentials["client_id"], client_credentials["client_secret"])
    assert form_post(Client(), right).status_code == 429
    assert form_post(Client(REMOTE_ADDR=ELSEWHERE), right).status_code == 200


@override_settings(AUTH_FAILURE_RATE="20/5m")
def test_bad_vend_tokens_on_the_agent_api_are_throttled(anthropic: Backend) -> None:
    _, vend = enroll()
    for n in range(20):
        response = as_agent(f"ckr_{n:043d}").get("/v1/enroll/status")
        assert response.status_code == 401
    throttled = as_agent("ckr_" + "x" * 43).get("/v1/enroll/status")
    assert throttled.status_code == 429
    assert "Retry-After" in throttled
    assert as_agent(vend).get("/v1/enroll/status").status_code == 429
    elsewhere = Client(HTTP_AUTHORIZATION=f"Bearer {vend}", REMOTE_ADDR=ELSEWHERE)
    assert elsewhere.get("/v1/enroll/status").status_code == 200
    # Throttled attempts write no rows; of the 20 failures, the default cap (10 per 10
    # minutes) kept 10 rows and one saying that the rest were suppressed.
    assert AuditEvent.objects.filter(action="auth.failed").count() == 11


@override_settings(
    AUTH_FAILURE_RATE="1000/5m",
    AUTH_CLIENT_FAILURE_RATE="1000/5m",
    AUTH_FAILURE_AUDIT_RATE="10/10m",
)
def test_failure_rows_are_capped_per_address_with_one_summary(anthropic: Backend) -> None:
    for n in range(30):
        form_post(Client(), token_form(f"c{n}", "cks_wrong"))
        as_agent(f"ckr_wrong{n}").get("/v1/enroll/status")
    rows = list(AuditEvent.objects.filter(action="auth.failed").order_by("id"))
    assert len(rows) == 11
    assert not any(row.detail.get("suppressed") for row in rows[:10])
    summary = rows[10]
    assert summary.detail.get("suppressed") is True
    assert "further failures suppressed" in summary.message
    assert summary.client_address == "127.0.0.1"
    # Another source still gets its own rows.
    as_agent("ckr_wrong").get("/v1/enroll/status", REMOTE_ADDR=ELSEWHERE)
    assert AuditEvent.objects.filter(action="auth.failed", client_address=ELSEWHERE).count() == 1


@override_settings(AUTH_FAILURE_RATE="3/2s")
def test_the_throttle_lifts_when_its_window_ends(anthropic: Backend) -> None:
    _, vend = enroll()
    for _ in range(3):
        assert as_agent("ckr_wrong").get("/v1/enroll/status").status_code == 401
    assert as_agent(vend).get("/v1/enroll/status").status_code == 429
    time.sleep(2.1)  # waiting out the 2 s window is what is tested
    assert as_agent(vend).get("/v1/enroll/status").status_code == 200


def test_a_good_credential_never_counts(anthropic: Backend) -> None:
    _, vend = enroll()
    for _ in range(50):
        assert send(as_agent(vend), "get", "/v1/enroll/status").status_code == 200
