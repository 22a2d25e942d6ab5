"""One rule, one message (issue 12): the admin form and the REST API refuse the same bad
input with the same words, each problem on the field it is about.

The admin form runs the services' own checks (backend_add_check, backend_update_check,
backend_rotate_check); the API renders the service's ServiceError, whose problems travel by
field, never as a string to split.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from broker.infra.errors import FieldErrors, NotPermitted, Problems, ServiceError
from broker.models import Agent, Backend
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.policy import grant_update
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = pytest.mark.django_db

ADMIN_ADD = "/admin/broker/backend/add/"
API = "/v1/admin/backends/"
ORGANIZATION = "0f8e3c4a-6b1d-4e2f-9a7c-5d3b2e1f0a9c"
KEY = api_key(tail="F13d")

# The admin form's names for the inputs whose service names differ.
FORM_NAMES = {
    "secret": "new_secret",
    "ttl": "token_ttl_min",
    "audience": "federation_audience",
    "federation": "federation_rule_id",
}


@pytest.fixture
def admin_page(alice: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(alice)
    return client


def as_form(body: dict[str, Any]) -> dict[str, Any]:
    """The same backend as the admin's add form posts it."""
    ttl = body.get("ttl", {"min": 60, "default": 600, "max": 3600})
    federation = body.get("federation", {})
    form = {
        "name": body["name"],
        "kind": body.get("kind", "anthropic"),
        "base_url": body.get("base_url", ""),
        "new_secret": body.get("secret", ""),
        "token_ttl_min": ttl["min"],
        "token_ttl_default": ttl["default"],
        "token_ttl_max": ttl["max"],
        "enabled": "on",
        "federation_audience": federation.get("audience", ""),
        **{k: v for k, v in federation.items() if k != "audience"},
    }
    if body.get("client_key"):
        form["client_key"] = "on"
    return form


def form_errors(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 200, "the form was accepted"
    return {name: list(texts) for name, texts in response.context["adminform"].form.errors.items()}


def api_post(admin_api: Client, url: str, body: Any, method: str = "post") -> Any:
    return getattr(admin_api, method)(url, json.dumps(body), content_type="application/json")


WIF = {"name": "wif", "kind": "anthropic-wif"}

SAME_WORDS: list[tuple[dict[str, Any], dict[str, list[str]]]] = [
    ({"name": "Bad Name", "secret": KEY}, {"name": ["use 1-63 lowercase"]}),
    ({"name": "x" * 64, "secret": KEY}, {"name": ["use 1-63 lowercase"]}),
    ({"name": "anthropic", "secret": "hunter2"}, {"secret": ["an Anthropic secret is an API key"]}),
    ({"name": "anthropic", "secret": ""}, {"secret": ["must not be empty"]}),
    (
        {"name": "anthropic", "secret": KEY, "base_url": "http://api.example.com"},
        {"base_url": ["must use https:// (plain http is allowed only on loopback)"]},
    ),
    (
        {"name": "anthropic", "secret": KEY, "ttl": {"min": 900, "default": 600, "max": 60}},
        {"ttl": ["token TTL bounds must satisfy 1s <= min <= default <= max <= 24h"]},
    ),
    (
        {"name": "anthropic", "secret": KEY, "ttl": {"min": 0, "default": 30, "max": 60}},
        {"ttl": ["token TTL bounds must satisfy"]},
    ),
    (
        {"name": "anthropic", "secret": KEY, "client_key": True},
        {"secret": ["a client-key backend stores no secret; leave it out"]},
    ),
    (
        {**WIF, "secret": KEY, "federation": {"federation_rule_id": "fdrl_01Abc"}},
        {
            "secret": ["an anthropic-wif backend stores no secret; leave it out"],
            "organization_id": ["required for an anthropic-wif backend"],
        },
    ),
    (
        {**WIF, "federation": {"federation_rule_id": "rule-7", "organization_id": "acme"}},
        {
            "federation_rule_id": ["expected fdrl_…"],
            "organization_id": ["must be your organization's UUID"],
        },
    ),
    (
        {
            **WIF,
            "federation": {
                "federation_rule_id": "fdrl_01Abc",
                "organization_id": ORGANIZATION,
                "audience": "https://a b",
            },
        },
        {"audience": ["at most 255 characters, no spaces"]},
    ),
    (
        {"name": "anthropic", "secret": KEY, "federation": {"federation_rule_id": "fdrl_01Abc"}},
        {"federation": ["only an anthropic-wif backend takes them (this one is anthropic)"]},
    ),
    (
        # Every problem at once, each on its own field.
        {"name": "Bad Name", "secret": "hunter2", "base_url": "ftp://x"},
        {
            "name": ["use 1-63 lowercase"],
            "base_url": ["must be an https:// URL"],
            "secret": ["an Anthropic secret is an API key"],
        },
    ),
]


@pytest.mark.parametrize(("body", "expected"), SAME_WORDS)
def test_the_admin_form_and_the_api_refuse_alike_on_each_field(
    admin_page: Client, admin_api: Client, body: dict[str, Any], expected: dict[str, list[str]]
) -> None:
    refused = api_post(admin_api, API, body)
    assert refused.status_code == 400, refused.content
    fields = refused.json()["error"]["fields"]
    on_form = form_errors(admin_page.post(ADMIN_ADD, as_form(body)))
    assert set(fields) == set(expected)
    for field, starts in expected.items():
        # The same words on both surfaces, and the ones expected.
        assert on_form[FORM_NAMES.get(field, field)] == fields[field], field
        assert len(fields[field]) == len(starts)
        for text, start in zip(fields[field], starts, strict=True):
            assert text.startswith(start), (field, text)
    # The one-line message keeps its shape: "field: text; field: text".
    message = refused.json()["error"]["message"]
    for field, texts in fields.items():
        assert f"{field}: {'; '.join(texts)}" in message
    assert KEY not in refused.content.decode()
    assert not Backend.objects.exists()


def test_a_taken_name_is_a_409_on_name_in_the_api_and_the_same_words_on_the_form(
    admin_page: Client, admin_api: Client
) -> None:
    backend_add(name="anthropic", secret=api_key())
    body = {"name": "anthropic", "secret": KEY}
    refused = api_post(admin_api, API, body)
    # It names the next step: someone adding a taken name usually means to change its key.
    taken = (
        "a backend named 'anthropic' exists; to replace its key, rotate it (`manage.py "
        "backend rotate anthropic`), or add a key to its pool (`manage.py backend key-add "
        "anthropic`)"
    )
    assert refused.status_code == 409
    assert refused.json()["error"] == {
        "type": "conflict",
        "message": f"name: {taken}",
        "fields": {"name": [taken]},
    }
    # Django's own "Backend with this Name already exists." is not said as well.
    assert form_errors(admin_page.post(ADMIN_ADD, as_form(body))) == {"name": [taken]}


def test_a_move_to_a_new_host_without_the_key_is_refused_alike(
    admin_page: Client, admin_api: Client, fake_anthropic: FakeAnthropic
) -> None:
    backend = backend_add(name="anthropic", secret=api_key(), base_url=fake_anthropic.url)
    refused = api_post(
        admin_api, API + "anthropic", {"base_url": "https://elsewhere.example"}, "patch"
    )
    assert refused.status_code == 403
    (text,) = refused.json()["error"]["fields"]["base_url"]
    assert text.startswith("elsewhere.example is a new host for backend anthropic")
    page = admin_page.post(
        f"/admin/broker/backend/{backend.pk}/change/",
        {
            "base_url": "https://elsewhere.example",
            "new_secret": "",
            "token_ttl_min": 60,
            "token_ttl_default": 600,
            "token_ttl_max": 3600,
            "enabled": "on",
        },
    )
    assert form_errors(page) == {"base_url": [text]}
    backend.refresh_from_db()
    assert backend.base_url == fake_anthropic.url


def test_a_rotation_of_a_backend_without_a_key_is_refused_on_the_secret_field(
    admin_page: Client, admin_api: Client
) -> None:
    backend = backend_add(name="byok", client_key=True)
    refused = api_post(admin_api, API + "byok/rotate", {"secret": KEY})
    assert refused.status_code == 400
    (text,) = refused.json()["error"]["fields"]["secret"]
    page = admin_page.post(
        f"/admin/broker/backend/{backend.pk}/change/",
        {
            "base_url": "",
            "new_secret": KEY,
            "token_ttl_min": 60,
            "token_ttl_default": 600,
            "token_ttl_max": 3600,
            "enabled": "on",
        },
    )
    assert form_errors(page) == {"new_secret": [text]}
    assert text == "backend byok uses the agents' own keys; it has none to rotate"


def test_policy_problems_come_back_by_field(
    admin_api: Client, alice: AbstractBaseUser, fake_anthropic: FakeAnthropic
) -> None:
    backend_add(name="anthropic", secret=api_key(), base_url=fake_anthropic.url)
    bob: Agent = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    refused = api_post(
        admin_api,
        f"/v1/admin/agents/{bob.pk}/grants/anthropic",
        {"rpm": 0, "paths": ["v1/messages"], "max_ttl": "9h"},
        "patch",
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert set(error["fields"]) == {"rpm", "paths", "max_ttl"}
    assert error["fields"]["rpm"] == ["must be at least 1, not 0 (leave it unset for no limit)"]
    assert "rpm: must be at least 1, not 0" in error["message"]
    with pytest.raises(FieldErrors) as raised:
        grant_update(grant=bob.grants.get(), policy={"rpm": 0, "tpm": "many"})
    assert raised.value.errors == {
        "rpm": ["must be at least 1, not 0 (leave it unset for no limit)"],
        "tpm": ["must be a whole number"],
    }


def test_drf_type_errors_come_back_by_dotted_field(admin_api: Client) -> None:
    refused = api_post(
        admin_api, API, {"name": "anthropic", "ttl": {"min": "x", "default": 1, "max": 2}}
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["fields"] == {"ttl.min": ["A valid integer is required."]}
    assert error["message"] == "ttl.min: A valid integer is required."


def test_a_refusal_about_no_field_has_no_fields(admin_api: Client) -> None:
    missing = admin_api.get(API + "nope")
    assert missing.json()["error"] == {"type": "not_found", "message": "no backend named 'nope'"}


def test_several_problems_keep_the_first_ones_status_and_every_field() -> None:
    problems = Problems()
    with problems.check():
        raise NotPermitted("not yours", "base_url")
    with problems.check():
        raise ServiceError("too long", "name")
    problems.add("also wrong", "name")
    with pytest.raises(FieldErrors) as raised:
        problems.raise_if_any()
    error = raised.value
    assert (error.status_code, error.error_type) == (403, "permission_denied")
    assert error.errors == {"base_url": ["not yours"], "name": ["too long", "also wrong"]}
    assert error.message == "base_url: not yours; name: too long; also wrong"
    assert ServiceError("plain").errors == {None: ["plain"]}
    assert ServiceError("short", "rpm").message == "rpm: short"


def test_a_field_whose_own_check_failed_gets_no_service_words_on_top(
    admin_page: Client,
) -> None:
    # The service saw no name at all, so its "use 1-63 lowercase …" would be about nothing.
    errors = form_errors(admin_page.post(ADMIN_ADD, as_form({"name": "", "secret": "hunter2"})))
    assert errors["name"] == ["This field is required."]
    assert errors["new_secret"][0].startswith("an Anthropic secret is an API key")


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"name": "b" * 64, "scopes": ["anthropic"]}, "name", "use at most 63 characters"),
        (
            {"name": "crd_abcdefghijkl", "scopes": ["anthropic"]},
            "name",
            "must not look like a credential (ckr_…, crd_…, sk-ant-…)",
        ),
        ({"name": "bob", "scopes": ["nope"]}, "scopes", "no backend named 'nope'"),
    ],
)
def test_enrollment_problems_come_back_by_field(
    fake_anthropic: FakeAnthropic, body: dict[str, Any], field: str, text: str
) -> None:
    backend_add(name="anthropic", secret=api_key(), base_url=fake_anthropic.url)
    refused = api_post(Client(), "/v1/enroll", body)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["fields"] == {field: [text]}
    assert error["message"] == f"{field}: {text}"
    assert not Agent.objects.exists()


def test_audit_filter_problems_come_back_by_field(admin_api: Client) -> None:
    refused = admin_api.get("/v1/admin/audit/", {"since": "yesterday-ish", "status": "6xx"})
    assert refused.status_code == 400
    fields = refused.json()["error"]["fields"]
    assert len(fields) == 1  # the first problem found; the filter stops there
    (field,) = fields
    assert field in {"since", "status"}
