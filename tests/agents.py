"""Shared cast for agent tests: alice the admin, an anthropic backend, bob the agent."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from broker.models import Agent, Backend
from broker.services.admin_tokens import admintoken_create
from broker.services.backends import backend_add
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key


@pytest.fixture
def alice() -> AbstractBaseUser:
    return get_user_model().objects.create_superuser("alice", password="alice-pw-123")


@pytest.fixture
def admin_api(alice: AbstractBaseUser) -> Client:
    token = admintoken_create(name="ci", username="alice").plaintext
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.fixture
def anthropic(fake_anthropic: FakeAnthropic) -> Backend:
    return backend_add(name="anthropic", secret=api_key(tail="Bk3d"), base_url=fake_anthropic.url)


@pytest.fixture
def staging(fake_anthropic: FakeAnthropic) -> Backend:
    return backend_add(
        name="anthropic-staging", secret=api_key(tail="St4g"), base_url=fake_anthropic.url
    )


def as_agent(vend_token: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {vend_token}")


def send(client: Client, method: str, url: str, body: Any = None) -> Any:
    if method == "get":
        return client.get(url)
    payload = json.dumps(body) if body is not None else ""
    return getattr(client, method)(url, payload, content_type="application/json")


def enroll(name: str = "bob", scopes: tuple[str, ...] = ("anthropic",)) -> tuple[Agent, str]:
    response = send(Client(), "post", "/v1/enroll", {"name": name, "scopes": list(scopes)})
    assert response.status_code == 201, response.content
    body = response.json()
    return Agent.objects.get(pk=body["id"]), body["vend_token"]


@pytest.fixture
def client_credentials(anthropic: Backend, admin_api: Client) -> dict[str, Any]:
    """Bob, approved, with an OAuth client of his own: ``client_id``, ``client_secret`` and
    ``agent_id``."""
    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    created = send(as_agent(vend), "post", "/v1/clients")
    assert created.status_code == 201
    body: dict[str, Any] = created.json()
    body["agent_id"] = str(agent.pk)
    return body
