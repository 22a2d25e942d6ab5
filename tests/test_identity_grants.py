"""Identity grants: an admin lets an agent get JWTs for another audience, for so long.

Without a grant, /oauth/token mints JWTs for keybroker alone; with one, the JWT carries the
granted audience and lifetime, is an audit event, and still never works at keybroker itself.
"""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from joserfc import jwt
from joserfc.jwk import KeySet

from audit.models import AuditEvent
from broker.models import Agent, Backend, IdentityGrant
from tests.agents import as_agent, enroll, send

pytestmark = pytest.mark.django_db

ANTHROPIC = "https://api.anthropic.com"


@pytest.fixture
def bob(anthropic: Backend, admin_api: Client) -> tuple[Agent, dict[str, Any]]:
    """An approved agent with OAuth client credentials."""
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    created = send(as_agent(vend), "post", "/v1/clients")
    assert created.status_code == 201
    return agent, created.json()


def token_for(credentials: dict[str, Any], **extra: str) -> Any:
    form = {
        "grant_type": "client_credentials",
        "client_id": credentials["client_id"],
        "client_secret": credentials["client_secret"],
        **extra,
    }
    return Client().post(
        "/oauth/token", urlencode(form), content_type="application/x-www-form-urlencoded"
    )


def verified_claims(token: str) -> dict[str, Any]:
    """The claims, once an independent library checked the signature against the JWKS."""
    jwks = Client().get("/.well-known/jwks.json").json()
    return dict(
        jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256", "ES256"]).claims
    )


def manage(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_a_granted_audience_gets_a_jwt_with_that_aud_and_the_grants_lifetime(
    bob: tuple[Agent, dict[str, Any]],
) -> None:
    agent, credentials = bob
    refused = token_for(credentials, audience=ANTHROPIC)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_target"

    said = manage("agent", "grant-identity", "bob", "--audience", ANTHROPIC)
    assert f"bob may now get identity tokens for {ANTHROPIC}, each valid for 10m" in said
    issued = token_for(credentials, audience=ANTHROPIC)
    assert issued.status_code == 200, issued.content
    assert issued.json()["expires_in"] == 600
    claims = verified_claims(issued.json()["access_token"])
    assert claims["aud"] == ANTHROPIC
    assert claims["iss"] == settings.PUBLIC_URL
    assert claims["sub"] == str(agent.pk)
    assert claims["exp"] - claims["iat"] == 600

    # `resource` (RFC 8707) is the other spelling; the lifetime changes with the grant.
    manage("agent", "grant-identity", "bob", "--audience", ANTHROPIC, "--lifetime", "2m")
    shorter = token_for(credentials, resource=ANTHROPIC).json()
    assert shorter["expires_in"] == 120
    claims = verified_claims(shorter["access_token"])
    assert claims["exp"] - claims["iat"] == 120
    assert IdentityGrant.objects.get().lifetime == 120


def test_revoking_the_grant_stops_new_tokens_and_other_audiences_stay_refused(
    bob: tuple[Agent, dict[str, Any]],
) -> None:
    _agent, credentials = bob
    manage("agent", "grant-identity", "bob", "--audience", ANTHROPIC)
    assert token_for(credentials, audience=ANTHROPIC).status_code == 200
    other = token_for(credentials, audience="https://api.anthropic.com/")  # matched exactly
    assert other.json()["error"] == "invalid_target"
    assert "may not get tokens for audience https://api.anthropic.com/" in str(other.json())

    said = manage("agent", "revoke-identity", "bob", "--audience", ANTHROPIC)
    assert "bob gets no more identity tokens" in said
    assert token_for(credentials, audience=ANTHROPIC).json()["error"] == "invalid_target"
    with pytest.raises(CommandError, match="has no identity grant"):
        manage("agent", "revoke-identity", "bob", "--audience", ANTHROPIC)


def test_an_identity_token_never_authenticates_the_agent_at_keybroker(
    bob: tuple[Agent, dict[str, Any]],
) -> None:
    _agent, credentials = bob
    manage("agent", "grant-identity", "bob", "--audience", ANTHROPIC)
    identity = token_for(credentials, audience=ANTHROPIC).json()["access_token"]
    own = token_for(credentials).json()["access_token"]
    assert as_agent(identity).get("/v1/status").status_code == 401
    assert as_agent(own).get("/v1/status").status_code == 200


def test_every_identity_token_is_an_audit_event_that_never_holds_it(
    bob: tuple[Agent, dict[str, Any]],
) -> None:
    _agent, credentials = bob
    manage("agent", "grant-identity", "bob", "--audience", ANTHROPIC, "--lifetime", "5m")
    tokens = [token_for(credentials, audience=ANTHROPIC).json()["access_token"] for _ in "ab"]

    events = AuditEvent.objects.filter(action="oidc.identity_token_issued").order_by("id")
    assert [e.detail["jti"] for e in events] == [verified_claims(t)["jti"] for t in tokens]
    assert {(e.agent, e.detail["audience"], e.detail["lifetime"]) for e in events} == {
        ("bob", ANTHROPIC, 300)
    }
    granted = AuditEvent.objects.get(action="identity.granted")
    assert granted.detail == {"audience": ANTHROPIC, "lifetime": 300}
    every_row = json.dumps(list(AuditEvent.objects.values()), default=str)
    for token in tokens:
        assert token not in every_row
        assert token.split(".")[2] not in every_row  # not even the signature


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--audience", " "], "audience: give the relying party's audience"),
        (["--audience", "https://a b"], "audience: must not contain spaces"),
        (["--audience", "http://testserver"], "keybroker's own audience needs no grant"),
        (["--audience", "crd_" + "x" * 40], "audience: must not look like a credential"),
        (["--audience", ANTHROPIC, "--lifetime", "30s"], "lifetime: must be between 1m and 1h"),
        (["--audience", ANTHROPIC, "--lifetime", "2h"], "lifetime: must be between 1m and 1h"),
        (["--audience", ANTHROPIC, "--lifetime", "soon"], "lifetime: 'soon' is not a duration"),
    ],
)
def test_bad_grants_are_refused_and_change_nothing(
    bob: tuple[Agent, dict[str, Any]], args: list[str], message: str, settings: Any
) -> None:
    settings.PUBLIC_URL = "http://testserver"
    with pytest.raises(CommandError, match=message):
        manage("agent", "grant-identity", "bob", *args)
    assert not IdentityGrant.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="identity.").exists()


def test_the_admin_api_grants_lists_changes_and_revokes(
    bob: tuple[Agent, dict[str, Any]], admin_api: Client, alice: AbstractBaseUser
) -> None:
    agent, credentials = bob
    url = f"/v1/admin/agents/{agent.pk}/identities"
    created = send(admin_api, "post", url, {"audience": ANTHROPIC, "lifetime": "15m"})
    assert created.status_code == 201, created.content
    body = created.json()
    assert (body["audience"], body["lifetime"], body["created_by"]) == (ANTHROPIC, 900, "alice")
    assert token_for(credentials, audience=ANTHROPIC).json()["expires_in"] == 900

    again = send(admin_api, "post", url, {"audience": ANTHROPIC, "lifetime": 300})
    assert again.json()["id"] == body["id"]
    assert [g["lifetime"] for g in admin_api.get(url).json()] == [300]

    for bad, expected in [
        ({"audience": ANTHROPIC, "ttl": "5m"}, "ttl: unknown field"),
        ({"audience": ANTHROPIC, "lifetime": True}, "lifetime: give seconds"),
        ({"audience": 7}, "audience: Not a valid string."),
        ({"audience": ANTHROPIC, "lifetime": "9h"}, "lifetime: must be between 1m and 1h"),
    ]:
        refused = send(admin_api, "post", url, bad)
        assert refused.status_code == 400
        assert expected in refused.json()["error"]["message"]
    assert IdentityGrant.objects.get().lifetime == 300

    assert admin_api.delete(f"{url}/{body['id']}").status_code == 204
    assert admin_api.get(url).json() == []
    assert admin_api.delete(f"{url}/{body['id']}").status_code == 404
    assert send(admin_api, "get", "/v1/admin/agents/nope/identities").status_code == 404
    not_an_admin = as_agent(credentials["client_secret"])
    assert send(not_an_admin, "post", url, {"audience": ANTHROPIC}).status_code == 401
    revoked = AuditEvent.objects.get(action="identity.revoked")
    assert (revoked.actor, revoked.detail["audience"]) == ("alice", ANTHROPIC)


def test_the_cli_lists_identities(bob: tuple[Agent, dict[str, Any]]) -> None:
    assert manage("agent", "identities", "bob") == "no identity grants\n"
    manage("agent", "grant-identity", "bob", "--audience", ANTHROPIC, "--lifetime", "1h")
    listed = manage("agent", "identities", "bob")
    assert ANTHROPIC in listed
    assert "1h" in listed
    as_json = json.loads(manage("agent", "identities", "bob", "--json"))
    assert [(g["audience"], g["lifetime"]) for g in as_json] == [(ANTHROPIC, 3600)]


def test_the_agent_page_allows_and_removes_an_audience(
    bob: tuple[Agent, dict[str, Any]], alice: AbstractBaseUser
) -> None:
    agent, credentials = bob
    browser = Client()
    browser.force_login(alice)
    page = f"/admin/broker/agent/{agent.pk}/change/"
    assert b"No identity tokens" in browser.get(page).content

    added = browser.post(
        f"/admin/broker/agent/{agent.pk}/identities/",
        {"identity-audience": ANTHROPIC, "identity-lifetime": "5m", "next": page},
        follow=True,
    )
    # The admin's message list capitalises the first letter.
    assert f"Bob may get identity tokens for {ANTHROPIC} (5m each)".encode() in added.content
    assert b'class="kb-identity-row"' in added.content
    assert token_for(credentials, audience=ANTHROPIC).json()["expires_in"] == 300

    bad = browser.post(
        f"/admin/broker/agent/{agent.pk}/identities/",
        {"identity-audience": ANTHROPIC, "identity-lifetime": "5h"},
        follow=True,
    )
    assert b"Lifetime: must be between 1m and 1h (got 5h). Nothing was saved." in bad.content
    assert IdentityGrant.objects.get().lifetime == 300

    grant = IdentityGrant.objects.get()
    assert (
        browser.get(f"/admin/broker/agent/{agent.pk}/identities/{grant.pk}/remove/").status_code
        == 405
    )
    removed = browser.post(
        f"/admin/broker/agent/{agent.pk}/identities/{grant.pk}/remove/", follow=True
    )
    assert f"Bob gets no more identity tokens for {ANTHROPIC}".encode() in removed.content
    assert not IdentityGrant.objects.exists()
