"""Bad input to the agent API: a clear 4xx every time, and nothing created."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from broker.models import Agent, Backend, Token
from tests.agents import as_agent, enroll, send

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"name": "bob"}, 400, "scopes"),
        ({"scopes": ["anthropic"]}, 400, "name"),
        ({"name": "bob", "scopes": "anthropic"}, 400, "scopes"),
        ({"name": 42, "scopes": ["anthropic"]}, 400, "name"),
        ({"name": "bob", "scopes": [["anthropic"]]}, 400, "scopes"),
        ({"name": "bob", "scopes": []}, 400, "scopes"),
        ({"name": "bob", "scopes": ["openai"]}, 400, "no backend named 'openai'"),
        ({"name": "x" * 10_000, "scopes": ["anthropic"]}, 400, "name"),
        ({"name": "bob smith", "scopes": ["anthropic"]}, 400, "name"),
        ({"name": "-bob", "scopes": ["anthropic"]}, 400, "name"),
        ({"name": "ckr_" + "A" * 43, "scopes": ["anthropic"]}, 400, "look like a credential"),
        ({"name": "bob", "scopes": ["anthropic"], "admin": True}, 400, "admin: unknown field"),
        ({"name": "bob", "scopes": ["anthropic"], "description": "d" * 501}, 400, "description"),
        ([1, 2, 3], 400, ""),
        ("bob", 400, ""),
    ],
)
def test_enroll_refuses_bad_bodies(anthropic: Backend, body: Any, status: int, says: str) -> None:
    response = send(Client(), "post", "/v1/enroll", body)
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert says in error["message"]
    assert len(error["message"]) < 300  # the 10 kB name is not echoed back
    assert not Agent.objects.exists()


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        ('{"name": "bob", "scopes": ["anthropic"]', "application/json"),
        ("", "application/json"),
        ("name=bob&scopes=anthropic", "application/x-www-form-urlencoded"),
        ("\xff\xfe", "application/json"),
    ],
)
def test_enroll_refuses_malformed_payloads(
    anthropic: Backend, payload: str, content_type: str
) -> None:
    response = Client().post("/v1/enroll", payload, content_type=content_type)
    assert response.status_code in {400, 415}
    assert response.json()["error"]["message"]
    assert not Agent.objects.exists()


def test_a_taken_name_is_a_conflict(anthropic: Backend) -> None:
    enroll("bob")
    again = send(Client(), "post", "/v1/enroll", {"name": "bob", "scopes": ["anthropic"]})
    assert again.status_code == 409
    assert again.json()["error"]["type"] == "conflict"
    assert Agent.objects.count() == 1


GARBAGE_HEADERS = [
    "",
    "Bearer",
    "Bearer ",
    "Basic Ym9iOnNlY3JldA==",
    "Bearer ckr_",
    "Bearer ckr_short",
    "Bearer crd_" + "A" * 43,
    "Bearer cka_" + "A" * 43,
    "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
    "Bearer eyJ.eyJ.x",
    "Bearer a b c",
    "Bearer " + "x" * 10_000,
    "bearer ckr_" + "B" * 43,
]


@pytest.mark.parametrize("header", GARBAGE_HEADERS)
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/v1/enroll/status"),
        ("get", "/v1/status"),
        ("post", "/v1/credentials/anthropic"),
        ("get", "/v1/active"),
        ("delete", "/v1/self"),
        ("post", "/v1/clients"),
    ],
)
def test_garbage_credentials_get_401_and_change_nothing(
    anthropic: Backend, header: str, method: str, url: str
) -> None:
    _agent, _ = enroll()
    client = Client(HTTP_AUTHORIZATION=header) if header else Client()
    response = send(client, method, url, {})
    assert response.status_code == 401, (header, response.content)
    assert response.json()["error"]["type"] == "authentication_error"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert Agent.objects.get().status == "pending"
    assert not Token.objects.exists()


def test_a_truncated_vend_token_is_refused(anthropic: Backend) -> None:
    _, vend = enroll()
    assert as_agent(vend[:-1]).get("/v1/enroll/status").status_code == 401
    assert as_agent(vend + "x").get("/v1/enroll/status").status_code == 401
    assert as_agent(vend).get("/v1/enroll/status").status_code == 200
    assert AuditEvent.objects.filter(action="auth.failed").count() == 2


def test_credentials_refuse_unknown_fields_and_bad_json(
    anthropic: Backend, admin_api: Client
) -> None:
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    bob = as_agent(vend)
    assert send(bob, "post", "/v1/credentials/anthropic", {"ttl": "5m", "x": 1}).status_code == 400
    bad_json = bob.post("/v1/credentials/anthropic", "{", content_type="application/json")
    assert bad_json.status_code == 400
    assert send(bob, "post", "/v1/request", {"scopes": ["nope"]}).status_code == 400
    assert send(bob, "post", "/v1/request", {"scopes": []}).status_code == 400
    assert bob.delete("/v1/active/../self").status_code == 404
    assert Agent.objects.get().status == "approved"
    assert not Token.objects.exists()


def test_admin_approve_refuses_scopes_it_does_not_know(
    anthropic: Backend, admin_api: Client
) -> None:
    agent, _ = enroll()
    refused = send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {"scopes": ["x"]})
    assert refused.status_code == 400
    assert Agent.objects.get().status == "pending"
    assert send(admin_api, "post", "/v1/admin/pending/nope/approve", {}).status_code == 404
