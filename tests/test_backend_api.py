from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from broker.models import Backend
from broker.services.admin_tokens import admintoken_create, admintoken_revoke
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = pytest.mark.django_db

URL = "/v1/admin/backends/"


@pytest.fixture
def alice() -> AbstractBaseUser:
    return get_user_model().objects.create_superuser("alice", password="alice-pw-123")


@pytest.fixture
def alice_token(alice: AbstractBaseUser) -> str:
    return admintoken_create(name="ci", username="alice").plaintext


@pytest.fixture
def api(alice_token: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {alice_token}")


def post(client: Client, url: str, body: Any) -> Any:
    return client.post(url, json.dumps(body), content_type="application/json")


def test_it_adds_lists_and_inspects_a_backend_without_ever_returning_the_secret(
    api: Client, fake_anthropic: FakeAnthropic
) -> None:
    key = api_key(tail="Xy9Q")
    fake_anthropic.valid_keys.add(key)
    created = post(api, URL, {"name": "anthropic", "secret": key, "base_url": fake_anthropic.url})
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["fingerprint"] == "sk-ant-api03-…Xy9Q"
    # Checked against the upstream before the answer, not queued.
    assert body["validation"]["state"] == "valid"
    assert body["keys"][0]["validation"]["state"] == "valid"
    assert body["ttl"] == {"min": 60, "default": 600, "max": 3600}
    listed = api.get(URL)
    inspected = api.get(URL + "anthropic")
    assert [b["name"] for b in listed.json()] == ["anthropic"]
    assert inspected.json()["auth_scheme"] == "x-api-key"
    for response in (created, listed, inspected):
        assert key.encode() not in response.content
        assert b"secret" not in response.content


def test_it_rotates_validates_updates_and_removes(
    api: Client, fake_anthropic: FakeAnthropic
) -> None:
    old_key, new_key = api_key(), api_key(tail="N3w2")
    fake_anthropic.valid_keys |= {old_key, new_key}
    post(api, URL, {"name": "anthropic", "secret": old_key, "base_url": fake_anthropic.url})
    rotated = post(api, URL + "anthropic/rotate", {"secret": new_key})
    assert rotated.status_code == 200
    assert rotated.json()["fingerprint"].endswith("N3w2")
    assert rotated.json()["validation"]["state"] == "valid"
    validated = api.post(URL + "anthropic/validate")
    assert validated.json()["validation"]["state"] == "valid"
    assert fake_anthropic.requests[-1].headers["x-api-key"] == new_key
    updated = api.patch(
        URL + "anthropic",
        json.dumps({"enabled": False, "ttl": {"min": 30, "default": 300, "max": 900}}),
        content_type="application/json",
    )
    assert updated.json()["enabled"] is False
    assert updated.json()["ttl"] == {"min": 30, "default": 300, "max": 900}
    assert api.delete(URL + "anthropic").status_code == 204
    assert not Backend.objects.exists()


def test_a_key_the_upstream_refuses_is_a_422_unless_allowed(
    api: Client, fake_anthropic: FakeAnthropic
) -> None:
    wrong, right = api_key(tail="Wr0n"), api_key(tail="R1gt")
    fake_anthropic.valid_keys.add(right)
    body = {"name": "anthropic", "secret": wrong, "base_url": fake_anthropic.url}
    refused = post(api, URL, body)
    assert refused.status_code == 422
    host = fake_anthropic.url.removeprefix("http://")
    assert refused.json()["error"]["type"] == "key_invalid"
    assert refused.json()["error"]["message"] == (
        f"secret: {host} refused this key (upstream answered 401 (authentication_error: "
        "invalid x-api-key)); nothing was saved: check that it is the whole key, of the right "
        "account"
    )
    assert not Backend.objects.exists()
    stored = post(api, URL, {**body, "allow_invalid": True})
    assert stored.status_code == 201
    assert stored.json()["validation"]["state"] == "invalid"
    refused_rotation = post(api, URL + "anthropic/rotate", {"secret": api_key(tail="Wr2n")})
    assert (refused_rotation.status_code, refused_rotation.json()["error"]["type"]) == (
        422,
        "key_invalid",
    )
    refused_key = post(api, URL + "anthropic/keys", {"secret": api_key(tail="Wr3n")})
    assert refused_key.status_code == 422
    assert Backend.objects.get().keys.count() == 1
    rotated = post(api, URL + "anthropic/rotate", {"secret": right})
    assert rotated.json()["validation"]["state"] == "valid"
    for response in (refused, stored, refused_rotation, rotated):
        assert wrong.encode() not in response.content
        assert right.encode() not in response.content


def test_an_unreachable_upstream_saves_the_key_unchecked(api: Client) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    created = post(api, URL, {"name": "anthropic", "secret": api_key(), "base_url": url})
    assert created.status_code == 201
    assert created.json()["validation"]["state"] == "unreachable"
    assert created.json()["validation"]["message"].startswith("cannot reach 127.0.0.1")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"name": "Bad Name", "secret": "KEY"}, 400, "name: use 1-63 lowercase"),
        ({"name": "anthropic", "secret": "KEY", "kind": "gemini"}, 400, "kind: unknown kind"),
        ({"name": "anthropic", "secret": ""}, 400, "secret: must not be empty"),
        ({"name": "anthropic"}, 400, "secret: must not be empty"),
        ({"name": "anthropic", "client_key": "yes"}, 400, "client_key: Must be a valid boolean."),
        ({"name": "anthropic", "secret": "not-a-key"}, 400, "secret: an Anthropic secret"),
        (
            {"name": "anthropic", "secret": "KEY", "base_url": "http://evil.example"},
            400,
            "base_url",
        ),
        ({"name": "anthropic", "secret": "KEY", "colour": "red"}, 400, "colour: unknown field"),
        ({"name": ["anthropic"], "secret": "KEY"}, 400, "name: Not a valid string."),
        ({"name": "x" * 10_000, "secret": "KEY"}, 400, "name: Ensure this field has no more"),
        (["not", "an", "object"], 400, "Invalid data"),
        (
            {"name": "anthropic", "secret": "KEY", "ttl": {"min": -5, "default": 1, "max": 2}},
            400,
            "ttl: token TTL bounds must satisfy 1s <= min",
        ),
    ],
)
def test_bad_input_gets_a_clear_400_and_changes_nothing(
    api: Client, body: Any, status: int, message: str
) -> None:
    key = api_key()
    body = json.loads(json.dumps(body).replace('"KEY"', json.dumps(key)))
    response = post(api, URL, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert message in error["message"], error["message"]
    assert key.encode() not in response.content
    assert not Backend.objects.exists()


def test_malformed_json_is_a_400(api: Client) -> None:
    response = api.post(URL, b'{"name": "anth', content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("JSON parse error")


def test_a_duplicate_is_409_and_an_unknown_backend_404(api: Client) -> None:
    assert post(api, URL, {"name": "anthropic", "secret": api_key()}).status_code == 201
    duplicate = post(api, URL, {"name": "anthropic", "secret": api_key()})
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["type"] == "conflict"
    missing = api.get(URL + "nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == {"type": "not_found", "message": "no backend named 'nope'"}


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer cka_" + "A" * 43,
        "Bearer cka_",
        "Bearer cka_\u00e9t\u00e9",
        "Basic YWxpY2U6cHc=",
        "Bearer",
        "Bearer a b c",
    ],
)
def test_charlie_without_a_valid_credential_gets_401(
    header: str | None, alice: AbstractBaseUser
) -> None:
    client = Client(HTTP_AUTHORIZATION=header) if header else Client()
    response = post(client, URL, {"name": "anthropic", "secret": api_key()})
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["type"] == "authentication_error"
    assert not Backend.objects.exists()


def test_a_revoked_token_stops_working_at_once(alice: AbstractBaseUser) -> None:
    issued = admintoken_create(name="ci", username="alice")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {issued.plaintext}")
    assert client.get(URL).status_code == 200
    admintoken_revoke(token_id=issued.token.pk)
    assert client.get(URL).status_code == 401


def test_a_non_staff_session_is_403_and_a_staff_session_works(alice: AbstractBaseUser) -> None:
    get_user_model().objects.create_user("bob", password="bob-pw-123")
    bob = Client()
    bob.login(username="bob", password="bob-pw-123")
    assert bob.get(URL).status_code == 403
    staff = Client()
    staff.login(username="alice", password="alice-pw-123")
    assert staff.get(URL).status_code == 200


def test_the_schema_documents_the_backend_api_with_a_write_only_secret(client: Client) -> None:
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    assert {"/v1/admin/backends/", "/v1/admin/backends/{name}/rotate"} <= set(schema["paths"])
    create = schema["components"]["schemas"]["BackendCreateInputRequest"]
    assert create["properties"]["secret"]["writeOnly"] is True
    assert "secret" not in schema["components"]["schemas"]["BackendOutput"]["properties"]
