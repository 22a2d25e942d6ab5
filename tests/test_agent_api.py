"""The agent API: enroll, wait, mint, list, revoke, unenroll; and everything it refuses."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.test import Client, override_settings
from django.utils import timezone

from audit.models import AuditEvent
from broker.models import Agent, Backend, Grant, Token
from tests.agents import as_agent, enroll, send

pytestmark = pytest.mark.django_db


def test_bob_enrolls_waits_is_approved_mints_lists_and_revokes(
    anthropic: Backend, admin_api: Client
) -> None:
    response = send(Client(), "post", "/v1/enroll", {"name": "bob", "scopes": ["anthropic"]})
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "pending"
    assert body["requested_scopes"] == ["anthropic"]
    assert body["vend_token"].startswith("ckr_")
    assert len(body["vend_token"]) >= 4 + 43  # 32 random bytes, base64
    bob = as_agent(body["vend_token"])

    waiting = bob.get("/v1/enroll/status")
    assert waiting.json()["status"] == "pending"
    refused = send(bob, "post", "/v1/credentials/anthropic", {"ttl": "30m"})
    assert refused.status_code == 403
    assert "pending approval" in refused.json()["error"]["message"]

    pending = admin_api.get("/v1/admin/pending/").json()
    assert [agent["name"] for agent in pending] == ["bob"]
    approved = send(admin_api, "post", f"/v1/admin/pending/{body['id']}/approve", {})
    assert approved.json()["status"] == "approved"
    assert approved.json()["scopes"] == ["anthropic"]
    assert approved.json()["decided_by"] == "alice"

    minted = send(bob, "post", "/v1/credentials/anthropic", {"ttl": "30m"})
    assert minted.status_code == 201, minted.content
    token = minted.json()
    assert token["token"].startswith("crd_")
    assert token["ttl"] == 1800
    assert token["base_url"] == f"{settings.PUBLIC_URL}/v1/proxy/anthropic"
    assert [t["id"] for t in bob.get("/v1/active").json()] == [token["id"]]
    assert token["token"] not in bob.get("/v1/active").content.decode()

    assert bob.delete(f"/v1/active/{token['id']}").status_code == 204
    assert bob.get("/v1/active").json() == []
    assert Token.objects.get(pk=token["id"]).revoked_at is not None
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    for action in ["agent.enrolled", "agent.approved", "token.issued", "token.revoked"]:
        assert action in actions


@pytest.mark.parametrize(
    ("ttl", "seconds"), [(None, 600), ("1h", 3600), ("90s", 90), (120, 120), ("300", 300)]
)
def test_it_mints_with_the_asked_ttl_or_the_backends_default(
    anthropic: Backend, admin_api: Client, ttl: object, seconds: int
) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    body = {} if ttl is None else {"ttl": ttl}
    minted = send(as_agent(vend), "post", "/v1/credentials/anthropic", body)
    assert minted.status_code == 201, minted.content
    assert minted.json()["ttl"] == seconds
    token = Token.objects.get()
    assert abs((token.expires_at - token.created_at).total_seconds() - seconds) < 2


@pytest.mark.parametrize("ttl", ["30s", "2h", 59, 3601])
def test_it_refuses_a_ttl_outside_the_bounds_and_names_them(
    anthropic: Backend, admin_api: Client, ttl: object
) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    refused = send(as_agent(vend), "post", "/v1/credentials/anthropic", {"ttl": ttl})
    assert refused.status_code == 400
    assert "1m to 1h" in refused.json()["error"]["message"]
    assert not Token.objects.exists()


@pytest.mark.parametrize("ttl", ["-5m", "abc", 0, "0s", True, [], {"m": 5}, "5 m", "1d", 1.5])
def test_it_refuses_a_malformed_ttl(anthropic: Backend, admin_api: Client, ttl: object) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    refused = send(as_agent(vend), "post", "/v1/credentials/anthropic", {"ttl": ttl})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith("ttl:")
    assert not Token.objects.exists()


def test_unenroll_kills_every_live_token_and_the_vend_token(
    anthropic: Backend, staging: Backend, admin_api: Client
) -> None:
    agent, vend = enroll(scopes=("anthropic", "anthropic-staging"))
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    bob = as_agent(vend)
    for backend in ["anthropic", "anthropic-staging", "anthropic"]:
        assert send(bob, "post", f"/v1/credentials/{backend}", {}).status_code == 201

    assert bob.delete("/v1/self").status_code == 204

    assert Token.objects.filter(revoked_at__isnull=True).count() == 0
    assert Token.objects.count() == 3
    gone = bob.get("/v1/enroll/status")
    assert gone.status_code == 401
    assert "unenrolled" in gone.json()["error"]["message"]
    assert AuditEvent.objects.filter(action="token.revoked").count() == 3
    # The name is free again; the old row stays for history.
    again = send(Client(), "post", "/v1/enroll", {"name": "bob", "scopes": ["anthropic"]})
    assert again.status_code == 201
    assert Agent.objects.filter(name="bob").count() == 2


def test_a_rejected_agent_can_mint_nothing(anthropic: Backend, admin_api: Client) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/reject", {"reason": "unknown host"})
    bob = as_agent(vend)
    assert bob.get("/v1/enroll/status").json()["status"] == "rejected"
    refused = send(bob, "post", "/v1/credentials/anthropic", {})
    assert refused.status_code == 403
    assert "rejected" in refused.json()["error"]["message"]
    assert bob.get("/v1/status").status_code == 403
    assert send(bob, "post", "/v1/clients").status_code == 403
    approve = send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    assert approve.status_code == 409
    assert not Token.objects.exists()
    assert not Grant.objects.exists()


def test_an_agent_without_a_grant_is_told_so(
    anthropic: Backend, staging: Backend, admin_api: Client
) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    refused = send(as_agent(vend), "post", "/v1/credentials/anthropic-staging", {})
    assert refused.status_code == 403
    assert "no grant for backend anthropic-staging" in refused.json()["error"]["message"]
    unknown = send(as_agent(vend), "post", "/v1/credentials/openai", {})
    assert unknown.status_code == 404


def test_a_disabled_backend_mints_nothing(anthropic: Backend, admin_api: Client) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    Backend.objects.filter(pk=anthropic.pk).update(enabled=False)
    refused = send(as_agent(vend), "post", "/v1/credentials/anthropic", {})
    assert refused.status_code == 403
    assert "disabled" in refused.json()["error"]["message"]


def test_more_scopes_wait_for_an_admin_who_may_narrow_them(
    anthropic: Backend, staging: Backend, admin_api: Client
) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    bob = as_agent(vend)
    asked = send(bob, "post", "/v1/request", {"scopes": ["anthropic-staging"]})
    assert asked.status_code == 202
    assert asked.json()["requested_scopes"] == ["anthropic-staging"]
    assert [a["name"] for a in admin_api.get("/v1/admin/pending/").json()] == ["bob"]
    refused = send(bob, "post", "/v1/credentials/anthropic-staging", {})
    assert refused.status_code == 403

    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {"scopes": []})
    status = bob.get("/v1/status").json()
    assert status["scopes"] == ["anthropic"]
    assert status["requested_scopes"] == []
    assert status["grants"][0]["ttl"] == {"min": 60, "default": 600, "max": 3600}

    send(bob, "post", "/v1/request", {"scopes": ["anthropic-staging"]})
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    assert bob.get("/v1/status").json()["scopes"] == ["anthropic", "anthropic-staging"]


def test_admin_lists_and_revokes_tokens(anthropic: Backend, admin_api: Client) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    minted = send(as_agent(vend), "post", "/v1/credentials/anthropic", {}).json()
    listed = admin_api.get("/v1/admin/tokens/?agent=bob").json()
    assert [(t["id"], t["state"]) for t in listed] == [(minted["id"], "live")]
    assert minted["token"] not in admin_api.get("/v1/admin/tokens/").content.decode()
    assert admin_api.delete(f"/v1/admin/tokens/{minted['id']}").status_code == 204
    assert admin_api.get("/v1/admin/tokens/").json() == []
    assert admin_api.get("/v1/admin/tokens/?state=all").json()[0]["state"] == "revoked"
    assert admin_api.delete("/v1/admin/tokens/not-a-uuid").status_code == 404
    # Found by the hostile-input suite: PostgreSQL refused the NUL with a 500.
    refused = admin_api.get("/v1/admin/tokens/?agent=b%00b")
    assert refused.status_code == 400
    assert "agent" in refused.json()["error"]["message"]


def test_an_agent_cannot_revoke_another_agents_token(anthropic: Backend, admin_api: Client) -> None:
    bob, bob_vend = enroll("bob")
    eve, eve_vend = enroll("eve")
    for agent in (bob, eve):
        send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    minted = send(as_agent(bob_vend), "post", "/v1/credentials/anthropic", {}).json()
    assert as_agent(eve_vend).delete(f"/v1/active/{minted['id']}").status_code == 404
    assert Token.objects.get().revoked_at is None


def test_admin_creates_an_approved_agent_and_grants_backends(
    anthropic: Backend, staging: Backend, admin_api: Client
) -> None:
    created = send(admin_api, "post", "/v1/admin/agents/", {"name": "ci", "scopes": ["anthropic"]})
    assert created.status_code == 201
    body = created.json()
    assert body["status"] == "approved"
    granted = send(
        admin_api, "post", f"/v1/admin/agents/{body['id']}/grants", {"backend": "anthropic-staging"}
    )
    assert granted.json()["scopes"] == ["anthropic", "anthropic-staging"]
    minted = send(as_agent(body["vend_token"]), "post", "/v1/credentials/anthropic-staging", {})
    assert minted.status_code == 201
    assert admin_api.delete(f"/v1/admin/agents/{body['id']}").status_code == 204
    assert Token.objects.get().revoked_at is not None


def test_agents_and_tokens_admin_api_needs_an_admin(anthropic: Backend) -> None:
    _, vend = enroll()
    for url in ["/v1/admin/agents/", "/v1/admin/pending/", "/v1/admin/tokens/"]:
        assert Client().get(url).status_code == 401
        assert as_agent(vend).get(url).status_code in {401, 403}


def test_the_sweep_records_each_expiry_once_and_forgets_old_rows(
    anthropic: Backend, admin_api: Client
) -> None:
    from broker.services.tokens import tokens_sweep

    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    for _ in range(2):
        send(as_agent(vend), "post", "/v1/credentials/anthropic", {"ttl": "1m"})
    later = timezone.now() + timedelta(minutes=2)

    first, second = tokens_sweep(now=later), tokens_sweep(now=later)

    assert (first.expired, second.expired) == (2, 0)
    assert AuditEvent.objects.filter(action="token.expired").count() == 2
    assert Token.objects.filter(expired_at__isnull=False).count() == 2
    long_after = timezone.now() + timedelta(days=30)
    assert tokens_sweep(now=long_after).deleted == 2
    assert not Token.objects.exists()


def test_beat_runs_the_sweep_every_minute(anthropic: Backend, admin_api: Client) -> None:
    from broker.tasks import tokens_sweep_task

    schedule = settings.CELERY_BEAT_SCHEDULE["tokens-sweep"]
    assert (schedule["task"], schedule["schedule"]) == ("broker.tasks.tokens_sweep_task", 60)
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    send(as_agent(vend), "post", "/v1/credentials/anthropic", {"ttl": "1m"})
    Token.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    tokens_sweep_task.apply()
    assert AuditEvent.objects.filter(action="token.expired").count() == 1


def test_an_expired_token_is_not_live_before_the_sweep(
    anthropic: Backend, admin_api: Client
) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    send(as_agent(vend), "post", "/v1/credentials/anthropic", {"ttl": "1m"})
    Token.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert as_agent(vend).get("/v1/active").json() == []


@override_settings(ENROLL_RATE="3/10m")
def test_an_enrollment_flood_gets_429_with_retry_after(anthropic: Backend) -> None:
    answers = [
        send(Client(), "post", "/v1/enroll", {"name": f"bot-{n}", "scopes": ["anthropic"]})
        for n in range(5)
    ]
    assert [a.status_code for a in answers] == [201, 201, 201, 429, 429]
    assert 0 < int(answers[3]["Retry-After"]) <= 600
    assert Agent.objects.count() == 3
    # Another address has its own allowance.
    other = Client(REMOTE_ADDR="10.1.2.3")
    assert (
        send(other, "post", "/v1/enroll", {"name": "x", "scopes": ["anthropic"]}).status_code == 201
    )


def test_taking_a_backend_away_kills_its_tokens_and_nothing_else(
    anthropic: Backend, staging: Backend, admin_api: Client
) -> None:
    agent, vend = enroll(scopes=("anthropic", "anthropic-staging"))
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    bob = as_agent(vend)
    kept = send(bob, "post", "/v1/credentials/anthropic", {}).json()
    taken = send(bob, "post", "/v1/credentials/anthropic-staging", {}).json()

    removed = admin_api.delete(f"/v1/admin/agents/{agent.pk}/grants/anthropic-staging")

    assert removed.status_code == 204
    assert Token.objects.get(pk=taken["id"]).revoked_at is not None
    assert Token.objects.get(pk=kept["id"]).revoked_at is None
    assert bob.get("/v1/status").json()["scopes"] == ["anthropic"]
    refused = send(bob, "post", "/v1/credentials/anthropic-staging", {})
    assert refused.status_code == 403
    event = AuditEvent.objects.get(action="grant.removed")
    assert (event.backend, event.detail["tokens_revoked"]) == ("anthropic-staging", 1)
    again = admin_api.delete(f"/v1/admin/agents/{agent.pk}/grants/anthropic-staging")
    assert again.status_code == 404
