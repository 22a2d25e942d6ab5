"""keybroker as an OIDC provider: client credentials in, a JWT that others can verify out."""

from __future__ import annotations

import base64
import io
import time
from typing import Any
from urllib.parse import urlencode

import jwt as pyjwt
import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import Client
from joserfc import jwt
from joserfc.jwk import KeySet

from broker.models import SigningKey, Token
from broker.services.oidc import signing_key_current
from tests.agents import as_agent, send

pytestmark = pytest.mark.django_db

FORM = "application/x-www-form-urlencoded"


def token_request(credentials: dict[str, Any], **extra: str) -> Any:
    form = {
        "grant_type": "client_credentials",
        "client_id": credentials["client_id"],
        "client_secret": credentials["client_secret"],
        **extra,
    }
    return form_post(Client(), form)


def form_post(client: Client, form: dict[str, str]) -> Any:
    """As OAuth clients send it: application/x-www-form-urlencoded."""
    return client.post("/oauth/token", urlencode(form), content_type=FORM)


def test_discovery_names_the_issuer_and_its_endpoints() -> None:
    discovery = Client().get("/.well-known/openid-configuration").json()
    assert discovery["issuer"] == settings.PUBLIC_URL
    assert discovery["jwks_uri"] == f"{settings.PUBLIC_URL}/.well-known/jwks.json"
    assert discovery["token_endpoint"] == f"{settings.PUBLIC_URL}/oauth/token"
    assert "client_credentials" in discovery["grant_types_supported"]


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_a_jwt_verifies_against_the_jwks_with_an_independent_library(
    client_credentials: dict[str, Any], settings: Any, algorithm: str
) -> None:
    settings.OIDC_SIGNING_ALGORITHM = algorithm
    call_command("oidc", "rotate-key", stdout=io.StringIO())
    assert client_credentials["client_secret"].startswith("cks_")
    issued = token_request(client_credentials)
    assert issued.status_code == 200, issued.content
    body = issued.json()
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 3600
    assert issued["Cache-Control"] == "no-store"

    jwks = Client().get("/.well-known/jwks.json").json()
    token = jwt.decode(body["access_token"], KeySet.import_key_set(jwks), algorithms=[algorithm])
    assert token.header["alg"] == algorithm
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": settings.PUBLIC_URL},
        sub={"essential": True, "value": client_credentials["agent_id"]},
        aud={"essential": True, "value": settings.PUBLIC_URL},
        exp={"essential": True},
    ).validate(token.claims)
    assert token.header["kid"] in {key["kid"] for key in jwks["keys"]}
    assert token.claims["exp"] - token.claims["iat"] <= 3600


def test_the_jwt_authenticates_the_agent_and_mints_a_token(
    client_credentials: dict[str, Any],
) -> None:
    access = token_request(client_credentials).json()["access_token"]
    agent = as_agent(access)
    assert agent.get("/v1/status").json()["name"] == "bob"
    minted = send(agent, "post", "/v1/credentials/anthropic", {"ttl": "5m"})
    assert minted.status_code == 201
    assert Token.objects.get().agent_id is not None


def test_json_and_basic_auth_work_too(client_credentials: dict[str, Any]) -> None:
    as_json = send(
        Client(),
        "post",
        "/oauth/token",
        {
            "grant_type": "client_credentials",
            "client_id": client_credentials["client_id"],
            "client_secret": client_credentials["client_secret"],
        },
    )
    assert as_json.status_code == 200
    basic = base64.b64encode(
        f"{client_credentials['client_id']}:{client_credentials['client_secret']}".encode()
    ).decode()
    with_basic = form_post(
        Client(HTTP_AUTHORIZATION=f"Basic {basic}"), {"grant_type": "client_credentials"}
    )
    assert with_basic.status_code == 200


def _signed(claims: dict[str, Any], **header: str) -> str:
    key = signing_key_current()
    return pyjwt.encode(
        claims, key.private_pem, algorithm=key.algorithm, headers={"kid": key.kid, **header}
    )


def test_an_expired_or_tampered_jwt_gets_401(client_credentials: dict[str, Any]) -> None:
    access = token_request(client_credentials).json()["access_token"]
    claims = pyjwt.decode(access, options={"verify_signature": False})
    now = int(time.time())
    expired = _signed({**claims, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600})
    header, _payload, signature = access.split(".")
    other_sub = _signed({**claims, "sub": "00000000-0000-0000-0000-000000000000"})
    tampered_payload = f"{header}.{other_sub.split('.')[1]}.{signature}"
    wrong_audience = _signed({**claims, "aud": "https://api.anthropic.com"})
    unsigned = pyjwt.encode(claims, key=None, algorithm="none")
    for bad in [expired, tampered_payload, wrong_audience, unsigned, access[:-4] + "AAAA"]:
        response = as_agent(bad).get("/v1/status")
        assert response.status_code == 401, bad
    assert as_agent(access).get("/v1/status").status_code == 200


@pytest.mark.parametrize(
    ("overrides", "status", "error"),
    [
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"client_secret": ""}, 401, "invalid_client"),
        ({"client_secret": "cks_nope"}, 401, "invalid_client"),
        ({"client_id": "kbc_nope"}, 401, "invalid_client"),
        ({"audience": "https://evil.example"}, 400, "invalid_target"),
    ],
)
def test_the_token_endpoint_answers_rfc_6749_errors(
    client_credentials: dict[str, Any], overrides: dict[str, str], status: int, error: str
) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": client_credentials["client_id"],
        "client_secret": client_credentials["client_secret"],
        **overrides,
    }
    response = form_post(Client(), form)
    assert response.status_code == status
    body = response.json()
    assert body["error"] == error
    assert body["error_description"]
    assert client_credentials["client_secret"] not in response.content.decode()


def test_malformed_token_requests_are_invalid_requests() -> None:
    bad_json = Client().post("/oauth/token", "{", content_type="application/json")
    assert bad_json.status_code == 400
    assert bad_json.json()["error"] == "invalid_request"


def test_a_rotated_key_stays_published_and_old_jwts_keep_working(
    client_credentials: dict[str, Any],
) -> None:
    before = token_request(client_credentials).json()["access_token"]
    old_kid = signing_key_current().kid
    out = io.StringIO()
    call_command("oidc", "rotate-key", stdout=out)
    new = SigningKey.objects.get(retired_at__isnull=True)
    assert new.kid in out.getvalue()
    after = token_request(client_credentials).json()["access_token"]
    kids = {key["kid"] for key in Client().get("/.well-known/jwks.json").json()["keys"]}
    assert kids == {old_kid, new.kid}
    assert pyjwt.get_unverified_header(after)["kid"] == new.kid
    assert as_agent(before).get("/v1/status").status_code == 200
    assert as_agent(after).get("/v1/status").status_code == 200
    assert SigningKey.objects.filter(retired_at__isnull=True).count() == 1


def test_unenrolling_kills_its_jwts(client_credentials: dict[str, Any]) -> None:
    access = token_request(client_credentials).json()["access_token"]
    assert as_agent(access).delete("/v1/self").status_code == 204
    assert as_agent(access).get("/v1/status").status_code == 401
    assert token_request(client_credentials).status_code == 401
