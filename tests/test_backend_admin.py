from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from broker.models import Backend
from broker.services.backends import backend_add
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client() -> Client:
    get_user_model().objects.create_superuser("alice", password="alice-pw-123")
    client = Client()
    client.login(username="alice", password="alice-pw-123")
    return client


def form(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "anthropic",
        "kind": "anthropic",
        "base_url": "",
        "new_secret": api_key(),
        "token_ttl_min": 60,
        "token_ttl_default": 600,
        "token_ttl_max": 3600,
        "enabled": "on",
        **overrides,
    }


def test_alice_adds_a_backend_and_never_sees_its_secret_again(
    admin_client: Client, fake_anthropic: FakeAnthropic
) -> None:
    key = api_key(tail="Xy9Q")
    fake_anthropic.valid_keys.add(key)
    response = admin_client.post(
        "/admin/broker/backend/add/", form(new_secret=key, base_url=fake_anthropic.url)
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    backend = Backend.objects.get()
    assert backend.secret == key
    listing = admin_client.get("/admin/broker/backend/")
    change = admin_client.get(f"/admin/broker/backend/{backend.pk}/change/")
    for page in (listing, change):
        assert page.status_code == 200
        assert key not in page.content.decode()
    assert "sk-ant-api03-…Xy9Q" in listing.content.decode()
    # Checked against the upstream when it was added.
    assert 'class="kb-status kb-status-valid"' in listing.content.decode()
    # The password box is never pre-filled.
    assert 'name="new_secret"' in change.content.decode()
    assert 'name="new_secret" value' not in change.content.decode()


def test_a_blank_secret_keeps_it_and_a_new_one_rotates(
    admin_client: Client, fake_anthropic: FakeAnthropic
) -> None:
    key, new_key = api_key(), api_key(tail="N3w2")
    fake_anthropic.valid_keys.add(new_key)  # a new key is checked before it is saved
    backend = backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    url = f"/admin/broker/backend/{backend.pk}/change/"
    assert admin_client.post(url, form(new_secret="", token_ttl_max=1800)).status_code == 302
    backend.refresh_from_db()
    assert (backend.secret, backend.token_ttl_max, backend.rotated_at) == (key, 1800, None)
    assert admin_client.post(url, form(new_secret=new_key)).status_code == 302
    backend.refresh_from_db()
    assert backend.secret == new_key
    assert backend.rotated_at is not None


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"new_secret": "hunter2"}, "an Anthropic secret is an API key"),
        ({"new_secret": ""}, "must not be empty"),
        ({"name": "Bad Name"}, "use 1-63 lowercase"),
        ({"base_url": "http://api.example.com"}, "must use https://"),
        ({"token_ttl_min": 900, "token_ttl_max": 60}, "token TTL bounds"),
    ],
)
def test_bad_input_shows_on_the_form_and_saves_nothing(
    admin_client: Client, overrides: dict[str, Any], error: str
) -> None:
    response = admin_client.post("/admin/broker/backend/add/", form(**overrides))
    assert response.status_code == 200
    assert error in response.content.decode()
    assert "hunter2" not in response.content.decode()
    assert not Backend.objects.exists()


def test_validate_now_checks_the_upstream(
    admin_client: Client, fake_anthropic: FakeAnthropic
) -> None:
    key = api_key()
    fake_anthropic.valid_keys.add(key)
    backend = backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    response = admin_client.post(
        "/admin/broker/backend/",
        {"action": "validate_now", "_selected_action": [backend.pk]},
        follow=True,
    )
    assert "Backend anthropic: valid" in response.content.decode()
    assert 'class="kb-status kb-status-valid"' in response.content.decode()
    assert key not in response.content.decode()


def test_a_key_added_to_the_pool_is_checked_first(
    admin_client: Client, fake_anthropic: FakeAnthropic
) -> None:
    good, wrong = api_key(tail="G00d"), api_key(tail="Wr0n")
    fake_anthropic.valid_keys.add(good)
    backend = backend_add(name="anthropic", secret=good, base_url=fake_anthropic.url)
    url = f"/admin/broker/backend/{backend.pk}/change/"
    refused = admin_client.post(url, form(new_secret="", add_key=wrong, add_key_weight=1))
    assert refused.status_code == 200
    page = refused.content.decode()
    assert "refused this key (upstream answered 401" in page
    assert "to save it anyway" in page
    assert wrong not in page
    assert backend.keys.count() == 1
    stored = admin_client.post(
        url, form(new_secret="", add_key=wrong, add_key_weight=1, allow_invalid="on")
    )
    assert stored.status_code == 302
    added = backend.keys.get(fingerprint="sk-ant-api03-…Wr0n")
    assert added.validation_state == "invalid"  # stored as ticked, and known for what it is
