"""One story through every surface, then a scan of everything it produced for the secrets."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client

from audit.models import AuditEvent
from broker.models import Backend
from broker.services.admin_tokens import admintoken_create
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key, oauth_token

pytestmark = pytest.mark.django_db


def test_no_surface_ever_shows_an_upstream_secret(
    fake_anthropic: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first, second, bearer = api_key(), api_key(), oauth_token()
    fake_anthropic.valid_keys.add(bearer)
    get_user_model().objects.create_superuser("alice", password="alice-pw-123")
    token = admintoken_create(name="ci", username="alice").plaintext
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    browser = Client()
    browser.login(username="alice", password="alice-pw-123")

    def post(url: str, body: object) -> bytes:
        return api.post(url, json.dumps(body), content_type="application/json").content

    seen: list[bytes] = [
        post(
            "/v1/admin/backends/",
            {
                "name": "anthropic",
                "secret": first,
                "base_url": fake_anthropic.url,
                "allow_invalid": True,
            },
        ),
        post(
            "/v1/admin/backends/",
            {"name": "oauth", "secret": bearer, "base_url": fake_anthropic.url},
        ),
        # Bad input that carries a secret: a wrong name, an unknown field, a key as the name.
        post("/v1/admin/backends/", {"name": "Bad Name", "secret": second}),
        post("/v1/admin/backends/", {"name": "x", "secret": second, "extra": second}),
        post("/v1/admin/backends/", {"name": second, "secret": second}),
        api.get(f"/v1/admin/backends/{second}").content,
        post("/v1/admin/backends/anthropic/validate", {}),  # fails: 401 upstream
        post("/v1/admin/backends/anthropic/rotate", {"secret": second, "allow_invalid": True}),
        post("/v1/admin/backends/anthropic/rotate", {"secret": "sk-ant-api03-short"}),
        post("/v1/admin/backends/oauth/validate", {}),
        api.get("/v1/admin/backends/").content,
        api.get("/v1/admin/backends/anthropic").content,
        browser.get("/admin/broker/backend/").content,
        *(
            browser.get(f"/admin/broker/backend/{pk}/change/").content
            for pk in Backend.objects.values_list("pk", flat=True)
        ),
        browser.get("/admin/audit/auditevent/").content,
        browser.post("/admin/broker/backend/add/", {"name": "x", "new_secret": first}).content,
        browser.get(f"/no/such/{first}").content,
        # A key the upstream refuses, refused on add (422, naming the upstream's answer).
        post(
            "/v1/admin/backends/", {"name": "y", "secret": second, "base_url": fake_anthropic.url}
        ),
        api.get("/api/schema/").content,
        api.get("/metrics").content,  # key states by backend: never a key or its fingerprint
    ]
    commands = [
        ["backend", "ls"],
        ["backend", "inspect", "anthropic", "--json"],
        ["backend", "validate", "anthropic"],
        ["backend", "validate", "oauth"],
    ]
    for command in commands:
        out, err = io.StringIO(), io.StringIO()
        refused = ""
        try:
            call_command(*command, stdout=out, stderr=err)
        except CommandError as error:  # `validate` of a key that is invalid: exit 3
            refused = str(error)
        seen.append((out.getvalue() + err.getvalue() + refused).encode())

    audit_rows = json.dumps(list(AuditEvent.objects.values()), default=str).encode()
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM broker_backend")
        raw_rows = repr(cursor.fetchall()).encode()
        cursor.execute("SELECT * FROM broker_backendkey")  # the keys' own table (issue 15)
        raw_rows += repr(cursor.fetchall()).encode()
    logs = "\n".join(
        r.getMessage() + (caplog.handler.format(r) if r.exc_info else "") for r in caplog.records
    ).encode()

    assert len(seen) > 20
    for secret in (first, second, bearer):
        for blob in [*seen, audit_rows, raw_rows, logs]:
            assert secret.encode() not in blob
            assert secret[13:45].encode() not in blob
    # The story did happen: the scans looked at real output, not at empty pages.
    assert b"sk-ant-api03-\xe2\x80\xa6" in seen[10]
    assert sum(b"new_secret" in blob for blob in seen) >= 3  # both change pages and the add form
    assert b"upstream answered 401" in seen[6]
    assert AuditEvent.objects.filter(action="backend.rotated").exists()


@pytest.mark.django_db(transaction=True)
def test_no_surface_ever_shows_an_agents_secrets_after_they_were_issued(
    live_url: str,
    fake_anthropic: FakeAnthropic,
    caplog: pytest.LogCaptureFixture,
    settings: object,
) -> None:
    from broker.models import SigningKey
    from broker.services.backends import backend_add
    from tests.proxy_cast import audit_drained

    caplog.set_level(logging.DEBUG)
    key = api_key()
    fake_anthropic.valid_keys.add(key)
    backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    get_user_model().objects.create_superuser("alice", password="alice-pw-123")
    admin = Client()
    admin.login(username="alice", password="alice-pw-123")
    http = httpx.Client(base_url=live_url, timeout=10)

    vend = http.post("/v1/enroll", json={"name": "bob", "scopes": ["anthropic"]}).json()
    vend_token = vend["vend_token"]
    bob = {"Authorization": f"Bearer {vend_token}"}
    call_command("agent", "approve", "bob", stdout=io.StringIO())
    crd = http.post("/v1/credentials/anthropic", json={}, headers=bob).json()["token"]
    client = http.post("/v1/clients", headers=bob).json()
    form = {"grant_type": "client_credentials", "client_id": client["client_id"],
            "client_secret": client["client_secret"]}  # fmt: skip
    jwt = http.post("/oauth/token", data=form).json()["access_token"]
    secrets = [vend_token, crd, client["client_secret"], jwt, SigningKey.objects.get().private_pem]

    seen: list[bytes] = []
    for response in [
        http.get("/v1/status", headers=bob),
        http.get("/v1/active", headers=bob),
        http.get("/v1/enroll/status", headers={"Authorization": f"Bearer {jwt}"}),
        http.post("/v1/credentials/anthropic", json={"ttl": crd}, headers=bob),  # bad ttl
        http.post("/v1/enroll", json={"name": vend_token, "scopes": ["anthropic"]}),
        http.get("/v1/proxy/anthropic/v1/models", headers={"x-api-key": crd}),
        http.get("/v1/proxy/anthropic/v1/models", headers={"x-api-key": crd[:-2]}),
        http.post("/oauth/token", data={**form, "client_secret": vend_token}),
        http.get("/.well-known/jwks.json"),
        http.get(f"/no/such/{crd}"),
    ]:
        seen.append(response.content + str(response.headers).encode())
    agent_id = vend["id"]
    for page in [
        "/admin/",
        "/admin/broker/agent/",
        f"/admin/broker/agent/{agent_id}/change/",
        "/admin/broker/token/",
        "/admin/broker/oidcclient/",
        "/admin/audit/auditevent/",
    ]:
        seen.append(admin.get(page).content)  # fmt: skip
    for command in (["agent", "ls", "--json"], ["token", "ls", "--all"], ["agent", "pending"]):
        out = io.StringIO()
        call_command(*command, stdout=out, stderr=out)
        seen.append(out.getvalue().encode())
    audit_drained()
    audit_rows = json.dumps(list(AuditEvent.objects.values()), default=str).encode()
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()

    assert AuditEvent.objects.filter(action="proxy.request").count() == 2
    assert len(seen) > 15
    for secret in secrets:
        for blob in [*seen, audit_rows, logs]:
            assert secret.encode() not in blob
            assert secret[8:40].encode() not in blob
    assert b"Hello" not in audit_rows  # no content either
