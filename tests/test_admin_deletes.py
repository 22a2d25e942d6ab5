"""Deleting in the Django admin goes through the services (issue 19, item 12).

Before, the admin's own delete (the change page's button and "Delete selected") removed a
backend with its grants and tokens without backend_remove's check for live tokens, without
telling the proxy processes (the access generation) and without an audit event; admin API
tokens were deleted the same way instead of revoked.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from broker.infra.redis import redis_client, redis_key
from broker.models import AdminToken, Agent, Backend, Grant, Token
from broker.services.access import ACCESS_GENERATION
from broker.services.admin_tokens import admintoken_create
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.tokens import token_issue, token_revoke
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = pytest.mark.django_db

BACKENDS = "/admin/broker/backend/"
ADMIN_TOKENS = "/admin/broker/admintoken/"

Capture = Callable[..., Any]


def session(user: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def alice_admin(alice: AbstractBaseUser) -> Client:
    return session(alice)


@pytest.fixture
def dora() -> Client:
    """Staff who may view and delete backends, and nothing about tokens or grants."""
    user = get_user_model().objects.create_user("dora", password="dora-pw-123", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(codename__in=["view_backend", "delete_backend"])
    )
    return session(user)


@pytest.fixture
def bob(alice: AbstractBaseUser, fake_anthropic: FakeAnthropic) -> Agent:
    backend_add(name="anthropic", secret=api_key(), base_url=fake_anthropic.url)
    return agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent


def generation() -> bytes | None:
    value: bytes | None = redis_client().get(redis_key(ACCESS_GENERATION))
    return value


def removed_events() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="backend.removed").order_by("id"))


def test_removing_a_backend_writes_its_audit_event_and_tells_the_proxy(
    dora: Client,
    bob: Agent,
    alice: AbstractBaseUser,
    django_capture_on_commit_callbacks: Capture,
) -> None:
    backend = Backend.objects.get(name="anthropic")
    # History that goes with the backend: a revoked token and an expired one.
    token_revoke(token=token_issue(agent=bob, backend_name="anthropic").token, by=alice)
    expired = token_issue(agent=bob, backend_name="anthropic").token
    Token.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    url = f"{BACKENDS}{backend.pk}/delete/"
    confirm = dora.get(url)
    assert confirm.status_code == 200
    assert "Are you sure" in confirm.content.decode()
    before = generation()
    with django_capture_on_commit_callbacks(execute=True):
        response = dora.post(url, {"post": "yes"})
    assert response.status_code == 302, response.content.decode()[:3000]
    assert not Backend.objects.exists()
    assert not Grant.objects.exists()
    [event] = removed_events()
    assert (event.actor, event.backend, event.detail["forced"]) == ("dora", "anthropic", False)
    assert generation() != before


def test_a_backend_with_live_tokens_stays_and_the_page_says_why(
    alice_admin: Client, bob: Agent, django_capture_on_commit_callbacks: Capture
) -> None:
    backend = Backend.objects.get(name="anthropic")
    live = token_issue(agent=bob, backend_name="anthropic").token
    url = f"{BACKENDS}{backend.pk}/delete/"
    page = alice_admin.get(url).content.decode()
    assert "1 live token" in page
    assert 'name="post" value="yes"' not in page  # no confirm button
    with django_capture_on_commit_callbacks(execute=True):
        refused = alice_admin.post(url, {"post": "yes"})
    assert "1 live token" in refused.content.decode()
    assert Backend.objects.filter(pk=backend.pk).exists()
    live.refresh_from_db()
    assert live.revoked_at is None
    assert removed_events() == []


def test_delete_selected_removes_each_backend_through_the_service(
    alice_admin: Client, bob: Agent, django_capture_on_commit_callbacks: Capture
) -> None:
    backend_add(name="spare", secret=api_key())
    chosen = list(Backend.objects.values_list("pk", flat=True))
    form = {"action": "delete_selected", "_selected_action": chosen}
    confirm = alice_admin.post(BACKENDS, form)
    assert confirm.status_code == 200
    assert "Are you sure" in confirm.content.decode()
    before = generation()
    with django_capture_on_commit_callbacks(execute=True):
        done = alice_admin.post(BACKENDS, {**form, "post": "yes"}, follow=True)
    assert done.status_code == 200
    assert not Backend.objects.exists()
    assert [(e.backend, e.actor) for e in removed_events()] == [
        ("anthropic", "alice"),
        ("spare", "alice"),
    ]
    assert generation() != before


def test_delete_selected_removes_nothing_while_one_has_live_tokens(
    alice_admin: Client, bob: Agent
) -> None:
    backend_add(name="spare", secret=api_key())
    token_issue(agent=bob, backend_name="anthropic")
    chosen = list(Backend.objects.values_list("pk", flat=True))
    form = {"action": "delete_selected", "_selected_action": chosen, "post": "yes"}
    refused = alice_admin.post(BACKENDS, form)
    assert "1 live token" in refused.content.decode()
    assert Backend.objects.count() == 2
    assert removed_events() == []


def test_who_may_not_delete_backends_cannot(bob: Agent) -> None:
    viewer = get_user_model().objects.create_user("vera", password="vera-pw-123", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_backend"))
    vera = session(viewer)
    backend = Backend.objects.get(name="anthropic")
    assert vera.post(f"{BACKENDS}{backend.pk}/delete/", {"post": "yes"}).status_code == 403
    vera.post(
        BACKENDS, {"action": "delete_selected", "_selected_action": [backend.pk], "post": "yes"}
    )
    assert Backend.objects.exists()
    assert removed_events() == []


# --- admin API tokens: revoked, never deleted ---------------------------------------------
@pytest.fixture
def ci_token(alice: AbstractBaseUser) -> AdminToken:
    return admintoken_create(name="ci", username="alice").token


def test_admin_tokens_cannot_be_deleted_in_the_admin(
    alice_admin: Client, ci_token: AdminToken
) -> None:
    listing = alice_admin.get(ADMIN_TOKENS).content.decode()
    assert "delete_selected" not in listing
    assert alice_admin.post(
        f"{ADMIN_TOKENS}{ci_token.pk}/delete/", {"post": "yes"}
    ).status_code in {
        403,
        404,
    }
    alice_admin.post(
        ADMIN_TOKENS,
        {"action": "delete_selected", "_selected_action": [ci_token.pk], "post": "yes"},
    )
    assert AdminToken.objects.filter(pk=ci_token.pk).exists()


def test_revoke_selected_revokes_admin_tokens_with_an_audit_event(
    alice_admin: Client, ci_token: AdminToken
) -> None:
    listing = alice_admin.get(ADMIN_TOKENS).content.decode()
    assert "revoke_selected" in listing
    done = alice_admin.post(
        ADMIN_TOKENS, {"action": "revoke_selected", "_selected_action": [ci_token.pk]}, follow=True
    )
    assert "Revoked 1 admin token" in done.content.decode()
    ci_token.refresh_from_db()
    assert ci_token.revoked_at is not None
    event = AuditEvent.objects.get(action="admintoken.revoked")
    assert (event.actor, event.token_prefix) == ("alice", ci_token.display_prefix)


def test_only_who_may_change_admin_tokens_revokes_them(ci_token: AdminToken) -> None:
    viewer = get_user_model().objects.create_user("vera", password="vera-pw-123", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_admintoken"))
    vera = session(viewer)
    assert "revoke_selected" not in vera.get(ADMIN_TOKENS).content.decode()
    vera.post(ADMIN_TOKENS, {"action": "revoke_selected", "_selected_action": [ci_token.pk]})
    ci_token.refresh_from_db()
    assert ci_token.revoked_at is None
