"""What held in the attack of issue 19, kept so: the parts no other test covered.

Covered elsewhere, not repeated here: SSRF and path tricks (test_proxy_isolation), body-parsing
tricks (test_policy_proxy, test_policy_hostile), revocation of new requests (test_proxy_wire,
test_proxy_isolation), secrets at rest and in logs (test_backend_services, test_logging,
test_secret_never_leaks).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
from typing import Any
from urllib.parse import quote

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from django.contrib import admin
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import audit_record
from broker.models import Backend
from broker.services.oidc import signing_key_current
from tests.conftest import REPO
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained
from tests.test_oidc import token_request
from tests.test_policy_proxy import HAIKU, HELLO, post, set_policy

pytestmark = pytest.mark.django_db(transaction=True)


# --- rpm under a burst ---------------------------------------------------------------------
def test_rpm_5_lets_exactly_5_of_200_concurrent_calls_through(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(rpm=5)

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            calls = [
                client.post(
                    f"{proxied.base_url}/v1/messages",
                    headers={"x-api-key": proxied.token},
                    json={"model": HAIKU, "max_tokens": 8, "messages": HELLO},
                )
                for _ in range(200)
            ]
            return [answer.status_code for answer in await asyncio.gather(*calls)]

    statuses = asyncio.run(burst())
    assert sorted(statuses) == [200] * 5 + [429] * 195
    assert len(fake_anthropic.requests) == 5


# --- JWT algorithm confusion ---------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """HS256 by hand: PyJWT refuses to use a PEM key as an HMAC secret, an attacker does not."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def _unsigned(claims: dict[str, Any], alg: str, kid: str) -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


@pytest.mark.django_db
def test_a_jwt_with_a_confused_algorithm_is_refused(
    client_credentials: dict[str, Any],
) -> None:
    access = token_request(client_credentials).json()["access_token"]
    claims = pyjwt.decode(access, options={"verify_signature": False})
    key = signing_key_current()
    private = serialization.load_pem_private_key(key.private_pem.encode(), password=None)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwks = Client().get("/.well-known/jwks.json").content
    other = "RS256" if key.algorithm == "ES256" else "ES256"
    (published,) = [k for k in json.loads(jwks)["keys"] if k["kid"] == key.kid]
    forged = [
        _unsigned(claims, "none", key.kid),
        _unsigned(claims, "None", key.kid),
        _unsigned(claims, "NONE", key.kid),
        _hs256(claims, public_pem, key.kid),
        _hs256(claims, public_pem.strip(), key.kid),
        _hs256(claims, jwks, key.kid),
        _hs256(claims, json.dumps(published).encode(), key.kid),
        # The real signature under another asymmetric algorithm's name.
        _b64(json.dumps({"alg": other, "kid": key.kid}).encode()) + access[access.index(".") :],
    ]
    for bad in forged:
        for url in ("/v1/status", "/v1/active"):
            answer = Client(HTTP_AUTHORIZATION=f"Bearer {bad}").get(url)
            assert answer.status_code == 401, (url, bad)
    assert Client(HTTP_AUTHORIZATION=f"Bearer {access}").get("/v1/status").status_code == 200


# --- CSRF on the admin REST API ------------------------------------------------------------
CSRF = "k" * 32  # a well-formed token; Django compares the header with the cookie


def _browser(alice: Any, *, with_cookie: bool = True) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    if with_cookie:
        client.cookies["csrftoken"] = CSRF
    return client


def test_a_session_without_a_csrf_token_changes_nothing_on_the_admin_api(
    alice: AbstractBaseUser, fake_anthropic: FakeAnthropic
) -> None:
    body = json.dumps({"name": "evil", "secret": "sk-ant-api03-" + "e" * 90})
    cases: list[tuple[Client, dict[str, Any]]] = [
        (_browser(alice, with_cookie=False), {}),
        (_browser(alice), {}),  # the cookie alone, as a cross-site form sends it
        (_browser(alice), {"HTTP_X_CSRFTOKEN": "z" * 32}),  # a wrong token
        # The right token from a foreign origin.
        (_browser(alice), {"HTTP_X_CSRFTOKEN": CSRF, "HTTP_ORIGIN": "http://evil.example"}),
    ]
    for client, extra in cases:
        made = client.post("/v1/admin/backends/", body, content_type="application/json", **extra)
        assert made.status_code == 403, (extra, made.content)
        assert b"CSRF" in made.content
    assert not Backend.objects.filter(name="evil").exists()

    # Against a backend that exists: neither a change nor a delete nor a rotation gets through.
    ok = _browser(alice)
    made = ok.post(
        "/v1/admin/backends/",
        json.dumps({"name": "anthropic", "secret": "sk-ant-api03-" + "a" * 90}),
        content_type="application/json",
        HTTP_X_CSRFTOKEN=CSRF,
    )
    assert made.status_code == 201, made.content  # the same session with the token works
    attacker = _browser(alice)
    for method, url, payload in [
        ("patch", "/v1/admin/backends/anthropic", {"enabled": False}),
        ("delete", "/v1/admin/backends/anthropic", None),
        ("post", "/v1/admin/backends/anthropic/rotate", {"secret": "sk-ant-api03-" + "b" * 90}),
    ]:
        data = json.dumps(payload) if payload is not None else ""
        answer = getattr(attacker, method)(url, data, content_type="application/json")
        assert answer.status_code == 403, (method, url, answer.content)
    backend = Backend.objects.get(name="anthropic")
    assert backend.enabled
    assert backend.secret == "sk-ant-api03-" + "a" * 90


# --- XSS: every admin page and the live feed -----------------------------------------------
XSS = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


def _pages() -> list[str]:
    """The admin index, every model's list and add page and every object's change page."""
    urls = [reverse("admin:index"), "/activity/"]
    for model in admin.site._registry:
        info = (model._meta.app_label, model._meta.model_name)
        urls.append(reverse("admin:{}_{}_changelist".format(*info)))
        urls.append(reverse("admin:{}_{}_add".format(*info)))
        for pk in model._default_manager.values_list("pk", flat=True)[:20]:
            urls.append(reverse("admin:{}_{}_change".format(*info), args=[pk]))
            urls.append(reverse("admin:{}_{}_history".format(*info), args=[pk]))
    return urls


def test_what_agents_choose_is_never_html_on_any_page(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: Any
) -> None:
    # Agents choose paths, models and request ids; they arrive in the audit as written.
    post(proxied, f"/v1/messages/{quote(XSS, safe='')}", json={"model": XSS, "max_tokens": 8})
    post(proxied, "/v1/messages", json={"model": XSS, "max_tokens": 8, "messages": HELLO})
    audit_record(action="proxy.request", backend=XSS, message=XSS, path=XSS, model=XSS)
    audit_drained()
    assert AuditEvent.objects.filter(detail__model=XSS).exists()

    browser = Client()
    browser.force_login(alice)
    pages = _pages()
    assert any("auditevent" in url and "change" in url for url in pages)
    escaped = []
    for url in pages:
        answer = browser.get(url)
        assert answer.status_code in {200, 302, 403}, (url, answer.status_code)
        html = answer.content.decode()
        assert "<img src=x" not in html, url
        assert "<script>alert" not in html, url
        if "&lt;img src=x" in html:
            escaped.append(url)
    # The payload is shown, as text: the audit list and the events' own pages.
    assert "/admin/audit/auditevent/" in escaped
    assert any(url.endswith("/change/") for url in escaped)
    # The live feed's first rows arrive as a JSON script block with `<` escaped.
    activity = browser.get("/activity/").content.decode()
    assert "\\u003Cimg src=x" in activity


def test_the_live_feed_writes_every_value_as_text() -> None:
    script = (REPO / "templates" / "activity.html").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "|safe" not in script
    assert "textContent" in script


# --- malformed headers ---------------------------------------------------------------------
def raw(url: str, head: bytes) -> tuple[int, bytes]:
    """Send the request head exactly as given; the status and whatever answer came back."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head)
        answer = sock.makefile("rb").read()
    return int(answer.split(b"\r\n", 1)[0].split()[1]), answer


def request_head(proxied: Proxied, path: str, *headers: bytes) -> bytes:
    host = proxied.base_url.removeprefix("http://").split("/")[0].encode()
    target = proxied.base_url.split(host.decode(), 1)[1].encode() + path.encode()
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: " + host, *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize(
    "headers",
    [
        [b"x-api-key: crd_\xff\xfe\x80bogus"],
        [b"x-api-key: \xc3\xa9\xe2\x82\xac"],
        [b"Authorization: Bearer crd_\xff\xfe"],
        [b"Authorization: Bearer"],
        [b"Authorization: \xff"],
        [b"x-api-key: crd_bogus", b"x-api-key: crd_other"],
        [b"x-api-key:"],
        [b"x-api-key: crd_" + b"A" * 8000],
        [b"anthropic-version: \xff\xff", b"x-api-key: crd_bogus"],
    ],
)
def test_a_malformed_credential_header_gets_a_clear_4xx(
    proxied: Proxied, fake_anthropic: FakeAnthropic, headers: list[bytes]
) -> None:
    status, answer = raw(proxied.base_url, request_head(proxied, "/v1/models", *headers))
    assert 400 <= status < 500, answer[:500]
    assert b'"authentication_error"' in answer  # Anthropic's error shape, which the SDK reads
    assert fake_anthropic.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        [b"x-api-key: {token}", b"x-api-key: {token}"],
        [b"x-api-key: {token}", b"x-api-key: crd_bogus"],
        [b"x-api-key: crd_bogus", b"x-api-key: {token}"],
        [b"x-api-key: {token}", b"Authorization: Bearer crd_bogus"],
        [b"x-api-key: {token}", b"x-custom: \xff\xfe\x80"],
        [b"x-api-key: {token}", b"anthropic-beta: \xe2\x82\xac"],
    ],
)
def test_duplicate_or_odd_headers_beside_a_good_token_never_fail_or_leak(
    proxied: Proxied, fake_anthropic: FakeAnthropic, headers: list[bytes]
) -> None:
    filled = [h.replace(b"{token}", proxied.token.encode()) for h in headers]
    status, answer = raw(proxied.base_url, request_head(proxied, "/v1/models", *filled))
    assert status < 500, answer[:500]
    assert proxied.token.encode() not in answer
    for seen in fake_anthropic.requests:
        assert seen.headers["x-api-key"] == proxied.key
        assert "authorization" not in seen.headers
        assert "crd_" not in json.dumps(dict(seen.headers))


@pytest.mark.parametrize(
    "header",
    [
        b"Authorization: Bearer ckr_\xff\xfe",
        b"Authorization: \xff\xfe\x80",
        b"Authorization: Bearer eyJ\xff.eyJ.x",
        b"Authorization: Bearer eyJhbGciOiJub25lIn0.\xff.",
    ],
)
def test_a_malformed_agent_credential_gets_a_clear_401(live_url: str, header: bytes) -> None:
    host = live_url.removeprefix("http://").encode()
    head = b"GET /v1/status HTTP/1.1\r\nHost: " + host + b"\r\n" + header
    status, answer = raw(live_url, head + b"\r\nConnection: close\r\n\r\n")
    assert status == 401, answer[:500]
