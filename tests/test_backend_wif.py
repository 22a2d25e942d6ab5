"""Adding, changing and validating a workload identity backend (kind anthropic-wif): it
stores no secret, only ids from the Claude Console, from the CLI, the REST API and the admin."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import CommandError, call_command
from django.test import Client

from audit.models import AuditEvent
from broker.models import Backend, ValidationState
from broker.services.backends import backend_validate
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key
from tests.wif import ORGANIZATION, SERVICE_ACCOUNT, WORKSPACE, trust_keybroker

pytestmark = pytest.mark.django_db

WIF_FLAGS = [
    "--kind", "anthropic-wif", "--federation-rule-id", "fdrl_01Abc",
    "--organization-id", ORGANIZATION.upper(), "--service-account-id", SERVICE_ACCOUNT,
]  # fmt: skip


def manage(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def validate(name: str) -> tuple[str, int, str]:
    """`backend validate NAME`: what it printed, its exit status and its error."""
    out = io.StringIO()
    try:
        call_command("backend", "validate", name, stdout=out, stderr=io.StringIO())
    except CommandError as refused:
        return out.getvalue(), refused.returncode, str(refused)
    return out.getvalue(), 0, ""


def test_the_cli_adds_a_federated_backend_that_stores_no_secret(
    fake_anthropic: FakeAnthropic,
) -> None:
    out = io.StringIO()
    with pytest.raises(CommandError) as refused:
        call_command(
            "backend", "add", "wif", *WIF_FLAGS, "--base-url", fake_anthropic.url, stdout=out
        )
    said = out.getvalue().splitlines()
    assert said[0] == (
        "added backend wif: no key stored; it exchanges keybroker's JWT (sub backend:wif, "
        "aud https://api.anthropic.com) under fdrl_01Abc"
    )
    # Validated at once: the console trusts no keybroker yet, so the exchange is refused;
    # the settings are stored (they hold no secret) and the exit status says so.
    assert said[1].startswith("wif: saved, but invalid: token exchange refused")
    assert refused.value.returncode == 3
    assert str(refused.value) == (
        "the token exchange of wif is refused: check its federation settings "
        "(`manage.py backend inspect wif`); the backend is stored"
    )
    backend = Backend.objects.get()
    assert backend.secret == ""
    assert backend.organization_id == ORGANIZATION  # a UUID, written the usual way
    assert backend.auth_scheme == "bearer"
    inspected = json.loads(manage("backend", "inspect", "wif", "--json"))
    assert inspected["kind"] == "anthropic-wif"
    assert inspected["fingerprint"] == "fdrl_01Abc (workload identity)"
    assert inspected["federation"] == {
        "federation_rule_id": "fdrl_01Abc",
        "organization_id": ORGANIZATION,
        "service_account_id": SERVICE_ACCOUNT,
        "workspace_id": "",
        "audience": "https://api.anthropic.com",
        "subject": "backend:wif",
    }
    added = AuditEvent.objects.get(action="backend.added")
    assert added.detail["federation_rule_id"] == "fdrl_01Abc"
    with pytest.raises(CommandError, match="uses workload identity and has no key to rotate"):
        manage("backend", "rotate", "wif", "--api-key", api_key())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "anthropic-wif"], "federation_rule_id: required for an anthropic-wif"),
        (
            ["--kind", "anthropic-wif", "--federation-rule-id", "rule-7"],
            "federation_rule_id: expected fdrl_…",
        ),
        (
            [*WIF_FLAGS[:4], "--organization-id", "acme"],
            "organization_id: must be your organization's UUID",
        ),
        ([*WIF_FLAGS, "--workspace-id", "ws 1"], "workspace_id: expected wrkspc_… or default"),
        ([*WIF_FLAGS, "--api-key", api_key()], "secret: an anthropic-wif backend stores no"),
        ([*WIF_FLAGS, "--client-key"], "client_key: an anthropic-wif backend uses workload"),
        (
            ["--api-key", api_key(), "--federation-rule-id", "fdrl_x"],
            "only an anthropic-wif backend takes them",
        ),
        ([*WIF_FLAGS, "--audience", "https://a b"], "audience: at most 255 characters, no"),
    ],
)
def test_bad_federation_settings_are_refused_and_save_nothing(
    args: list[str], message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        manage("backend", "add", "wif", *args)
    assert not Backend.objects.exists()


def test_the_admin_api_adds_and_changes_a_federated_backend(admin_api: Client) -> None:
    def call(method: str, url: str, body: Any) -> Any:
        return getattr(admin_api, method)(url, json.dumps(body), content_type="application/json")

    federation = {"federation_rule_id": "fdrl_01Abc", "organization_id": ORGANIZATION}
    created = call(
        "post",
        "/v1/admin/backends/",
        {"name": "wif", "kind": "anthropic-wif", "federation": federation},
    )
    assert created.status_code == 201, created.content
    assert created.json()["federation"]["audience"] == "https://api.anthropic.com"
    assert created.json()["client_key"] is False

    changed = call("patch", "/v1/admin/backends/wif", {"federation": {"workspace_id": WORKSPACE}})
    assert changed.status_code == 200, changed.content
    body = changed.json()
    assert body["federation"]["workspace_id"] == WORKSPACE
    assert body["federation"]["federation_rule_id"] == "fdrl_01Abc"  # kept
    assert body["rotated_at"] is not None  # a check running for the old settings is dropped
    updated = AuditEvent.objects.get(action="backend.updated")
    assert updated.detail == {"workspace_id": WORKSPACE}

    for method, url, bad, expected in [
        ("post", "/v1/admin/backends/", {"name": "x", "kind": "anthropic-wif"},
         "federation_rule_id: required"),
        ("post", "/v1/admin/backends/", {"name": "x", "kind": "anthropic-wif",
         "federation": {**federation, "secret": "s"}}, "federation.secret: unknown field"),
        ("post", "/v1/admin/backends/", {"name": "x", "secret": api_key(),
         "federation": federation}, "only an anthropic-wif backend takes them"),
        ("patch", "/v1/admin/backends/wif", {"federation": {"federation_rule_id": ""}},
         "federation.federation_rule_id: This field may not be blank."),
        ("post", "/v1/admin/backends/wif/rotate", {"secret": api_key()}, "no key to rotate"),
    ]:  # fmt: skip
        refused = call(method, url, bad)
        assert refused.status_code == 400, (bad, refused.content)
        assert expected in refused.json()["error"]["message"]
    assert Backend.objects.get().federation_rule_id == "fdrl_01Abc"
    assert Backend.objects.count() == 1


def test_the_admin_form_adds_a_federated_backend(alice: AbstractBaseUser) -> None:
    browser = Client()
    browser.force_login(alice)
    form = {
        "name": "wif", "kind": "anthropic-wif", "base_url": "", "token_ttl_min": 60,
        "token_ttl_default": 600, "token_ttl_max": 3600, "enabled": "on",
        "federation_rule_id": "fdrl_01Form", "organization_id": ORGANIZATION,
        "service_account_id": "", "workspace_id": "default", "federation_audience": "",
    }  # fmt: skip
    missing = browser.post("/admin/broker/backend/add/", {**form, "organization_id": ""})
    assert b"required for an anthropic-wif backend" in missing.content
    with_secret = browser.post("/admin/broker/backend/add/", {**form, "new_secret": api_key()})
    assert b"an anthropic-wif backend stores no secret" in with_secret.content
    assert not Backend.objects.exists()

    added = browser.post("/admin/broker/backend/add/", form)
    assert added.status_code == 302, added.content
    backend = Backend.objects.get()
    assert (backend.federation_rule_id, backend.workspace_id) == ("fdrl_01Form", "default")
    assert backend.federation_audience == "https://api.anthropic.com"
    page = browser.get(f"/admin/broker/backend/{backend.pk}/change/").content
    assert b"fdrl_01Form (workload identity)" in page


@pytest.mark.django_db(transaction=True)
def test_validation_exchanges_then_lists_models_with_the_access_token(
    live_url: str, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PUBLIC_URL = live_url
    rule_id = trust_keybroker(fake_anthropic, live_url, subject="backend:wif")
    said = manage(
        "backend", "add", "wif", "--kind", "anthropic-wif", "--federation-rule-id", rule_id,
        "--organization-id", ORGANIZATION, "--service-account-id", SERVICE_ACCOUNT,
        "--base-url", fake_anthropic.url,
    )  # fmt: skip
    host = fake_anthropic.url.removeprefix("http://")
    # The add validated it already; a later validation reuses its access token.
    assert said.splitlines()[1] == f"wif: valid: {host} accepted the federated access token"
    said, status, _ = validate("wif")
    assert status == 0
    assert said == f"wif: valid ({host} accepted the federated access token)\n"
    [exchange] = fake_anthropic.exchanges
    models = [r for r in fake_anthropic.requests if r.path == "/v1/models"]
    assert len(models) == 2
    for request in models:
        assert request.headers["authorization"] == f"Bearer {exchange.access_token}"
        assert request.headers["anthropic-beta"] == "oauth-2025-04-20"

    # The next check reuses the shared token: no second exchange.
    assert backend_validate(backend=Backend.objects.get()).state == ValidationState.VALID
    assert len(fake_anthropic.exchanges) == 1
    exchanged = AuditEvent.objects.get(action="backend.token_exchanged")
    assert (exchanged.backend, exchanged.detail["subject"]) == ("wif", "backend:wif")
    assert exchanged.detail["jti"] == exchange.claims["jti"]


@pytest.mark.django_db(transaction=True)
def test_a_refused_exchange_makes_the_backend_invalid_and_an_outage_unreachable(
    live_url: str, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PUBLIC_URL = live_url
    # The console's rule expects another subject: the JWT is verified, then refused.
    rule_id = trust_keybroker(fake_anthropic, live_url, subject="backend:other")
    with pytest.raises(CommandError, match="the backend is stored"):
        manage(
            "backend", "add", "wif", "--kind", "anthropic-wif", "--federation-rule-id", rule_id,
            "--organization-id", ORGANIZATION, "--service-account-id", SERVICE_ACCOUNT,
            "--base-url", fake_anthropic.url,
        )  # fmt: skip
    fake_anthropic.exchange_refusals.clear()
    said, status, error = validate("wif")
    assert (status, error) == (
        3,
        "the token exchange of wif is invalid: check its federation settings "
        "(`manage.py backend inspect wif`)",
    )
    assert said.startswith("wif: invalid (token exchange refused: upstream answered 401")
    assert "claims: invalid_claim" in said
    assert fake_anthropic.exchange_refusals == ["claims: invalid_claim: Invalid claim: 'sub'"]
    assert Backend.objects.get().validation_state == ValidationState.INVALID

    # An overloaded token endpoint says nothing about the settings.
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fake_anthropic.answer_next(529, overloaded)
    said, status, _ = validate("wif")
    assert status == 4
    assert said == (
        "wif: unreachable (token exchange refused: upstream answered 529 "
        "(overloaded_error: Overloaded))\n"
    )
    assert Backend.objects.get().validation_state == ValidationState.UNREACHABLE
    assert not [r for r in fake_anthropic.requests if r.path == "/v1/models"]
