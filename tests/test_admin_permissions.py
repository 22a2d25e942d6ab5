"""Who may do what on /v1/admin/: the Django model permissions, the same as in the admin.

The cast: alice (superuser), vera (staff who may only view), carl (staff who may only
change) and nina (not staff, though she holds every permission). Issue 19, item 1: staff
who may only look could move a backend to their own listener and have keybroker send the
real key there; now every admin endpoint checks its permission, and moving a backend to a
new host also needs its key entered with the change (or the host allowed by the operator).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.test import Client, override_settings
from django.urls import URLPattern, URLResolver, get_resolver

from audit.channels import channel_create
from audit.models import AuditEvent, NotificationChannel, NotificationDelivery
from broker.models import Agent, Backend, BackendKey, Grant, IdentityGrant, Token
from broker.services.admin_tokens import admintoken_create
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.identity import identity_grant
from broker.services.tokens import token_issue
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = pytest.mark.django_db

KEY = api_key(tail="R3al")


# --- the cast ----------------------------------------------------------------------------
def _user(name: str, *, staff: bool, actions: tuple[str, ...]) -> AbstractBaseUser:
    user = get_user_model().objects.create_user(name, password=f"{name}-pw-123", is_staff=staff)
    wanted = [
        perm
        for perm in Permission.objects.filter(content_type__app_label__in=["broker", "audit"])
        if perm.codename.split("_", 1)[0] in actions
    ]
    user.user_permissions.set(wanted)
    return user


def _token_client(user: AbstractBaseUser) -> Client:
    token = admintoken_create(name="api", username=user.get_username()).plaintext
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.fixture
def vera() -> Client:
    """Staff who may view everything and change nothing."""
    return _token_client(_user("vera", staff=True, actions=("view",)))


@pytest.fixture
def carl() -> Client:
    """Staff who may change everything, but neither add nor delete."""
    return _token_client(_user("carl", staff=True, actions=("change",)))


@pytest.fixture
def nina() -> Client:
    """Every permission, but not staff: the admin API is not hers."""
    client = Client()
    client.force_login(_user("nina", staff=False, actions=("view", "add", "change", "delete")))
    return client


@pytest.fixture
def superuser(alice: AbstractBaseUser) -> Client:
    return _token_client(alice)


@pytest.fixture
def world(fake_anthropic: FakeAnthropic, alice: AbstractBaseUser) -> dict[str, str]:
    """Two backends on the fake upstream, bob approved with a live token and an identity
    grant, dave waiting for approval."""
    fake_anthropic.valid_keys.add(KEY)
    backend_add(name="anthropic", secret=KEY, base_url=fake_anthropic.url)
    backend_add(name="staging", secret=api_key(), base_url=fake_anthropic.url)
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    dave = agent_enroll(name="dave", scopes=["anthropic"]).agent
    token = token_issue(agent=bob, backend_name="anthropic").token
    identity = identity_grant(agent=bob, audience="https://api.anthropic.com", by=alice)
    channel = channel_create(kind="webhook", url="https://hooks.example.com/x", events=["spike"])
    return {
        "channel": str(channel.channel.pk),
        "bob": str(bob.pk),
        "dave": str(dave.pk),
        "token": str(token.pk),
        "id": str(identity.pk),
    }


def send(client: Client, method: str, url: str, body: Any = None) -> Any:
    if method == "get":
        return client.get(url)
    payload = json.dumps(body) if body is not None else ""
    return getattr(client, method)(url, payload, content_type="application/json")


def snapshot() -> dict[str, Any]:
    """Everything an admin endpoint could change, and how many audit events there are."""
    return {
        "backends": list(
            Backend.objects.values_list(
                "name",
                "base_url",
                "enabled",
                "secret_fingerprint",
                "rotated_at",
                "validation_checked_at",
                "token_ttl_max",
                "default_rpm",
            )
        ),
        "agents": list(Agent.objects.values_list("name", "status", "requested_scopes")),
        "grants": list(Grant.objects.values_list("agent__name", "backend__name", "rpm")),
        "keys": list(BackendKey.objects.values_list("fingerprint", "enabled", "weight")),
        "identities": list(IdentityGrant.objects.values_list("agent__name", "audience")),
        "tokens": list(Token.objects.values_list("id", "revoked_at")),
        "events": AuditEvent.objects.count(),
        "channels": list(NotificationChannel.objects.values_list("id", "enabled", "events")),
        "deliveries": NotificationDelivery.objects.count(),
    }


# --- every admin endpoint ----------------------------------------------------------------
# (method, route in broker/project/urls.py, url, body, vera may, carl may). Reading needs view (or
# change, as in the admin); creating add; changing and actions (approve, reject, rotate,
# validate, revoke a token, unenroll an agent) change; removing a row delete.
ENDPOINTS: list[tuple[str, str, str, Any, bool, bool]] = [
    ("get", "v1/admin/backends/", "/v1/admin/backends/", None, True, True),
    (
        "post", "v1/admin/backends/", "/v1/admin/backends/",
        {"name": "third", "secret": api_key()}, False, False,
    ),
    ("get", "v1/admin/backends/<str:name>", "/v1/admin/backends/anthropic", None, True, True),
    (
        "patch", "v1/admin/backends/<str:name>", "/v1/admin/backends/anthropic",
        {"enabled": False, "ttl": {"min": 30, "default": 300, "max": 900}}, False, True,
    ),
    (
        "delete", "v1/admin/backends/<str:name>", "/v1/admin/backends/anthropic?force=1",
        None, False, False,
    ),
    (
        "post", "v1/admin/backends/<str:name>/rotate", "/v1/admin/backends/anthropic/rotate",
        {"secret": api_key(tail="N3w2")}, False, True,
    ),
    (
        "post", "v1/admin/backends/<str:name>/validate",
        "/v1/admin/backends/anthropic/validate", None, False, True,
    ),
    # A backend's key pool (issue 15): its keys are the backend's, so changing them is
    # changing the backend, as rotating its key is.
    ("get", "v1/admin/backends/<str:name>/keys", "/v1/admin/backends/anthropic/keys", None,
     True, True),
    (
        "post", "v1/admin/backends/<str:name>/keys", "/v1/admin/backends/anthropic/keys",
        {"secret": api_key(tail="K3y2")}, False, True,
    ),
    (
        "patch", "v1/admin/backends/<str:name>/keys/<str:fingerprint>",
        "/v1/admin/backends/anthropic/keys/sk-ant-api03-%E2%80%A6R3al", {"weight": 2}, False,
        True,
    ),
    (
        "delete", "v1/admin/backends/<str:name>/keys/<str:fingerprint>",
        "/v1/admin/backends/anthropic/keys/sk-ant-api03-%E2%80%A6R3al", None, False, True,
    ),
    (
        "get", "v1/admin/backends/<str:name>/policy", "/v1/admin/backends/anthropic/policy",
        None, True, True,
    ),
    (
        "patch", "v1/admin/backends/<str:name>/policy",
        "/v1/admin/backends/anthropic/policy", {"rpm": 5}, False, True,
    ),
    ("get", "v1/admin/agents/", "/v1/admin/agents/", None, True, True),
    # An agent created here is approved at once: enrolling and approving, add and change.
    (
        "post", "v1/admin/agents/", "/v1/admin/agents/",
        {"name": "eve", "scopes": ["anthropic"]}, False, False,
    ),
    ("get", "v1/admin/agents/<str:agent_id>", "/v1/admin/agents/{bob}", None, True, True),
    # Unenrolling keeps the row (history), as the admin's unenroll action does: change.
    ("delete", "v1/admin/agents/<str:agent_id>", "/v1/admin/agents/{bob}", None, False, True),
    # Granting with a policy: add and change of a grant.
    (
        "post", "v1/admin/agents/<str:agent_id>/grants", "/v1/admin/agents/{bob}/grants",
        {"backend": "staging", "rpm": 5}, False, False,
    ),
    (
        "get", "v1/admin/agents/<str:agent_id>/grants/<str:backend>",
        "/v1/admin/agents/{bob}/grants/anthropic", None, True, True,
    ),
    (
        "patch", "v1/admin/agents/<str:agent_id>/grants/<str:backend>",
        "/v1/admin/agents/{bob}/grants/anthropic", {"rpm": 5}, False, True,
    ),
    (
        "delete", "v1/admin/agents/<str:agent_id>/grants/<str:backend>",
        "/v1/admin/agents/{bob}/grants/anthropic", None, False, False,
    ),
    (
        "get", "v1/admin/agents/<str:agent_id>/identities",
        "/v1/admin/agents/{bob}/identities", None, True, True,
    ),
    (
        "post", "v1/admin/agents/<str:agent_id>/identities",
        "/v1/admin/agents/{bob}/identities", {"audience": "https://relying.example"},
        False, False,
    ),
    (
        "delete", "v1/admin/agents/<str:agent_id>/identities/<str:grant_id>",
        "/v1/admin/agents/{bob}/identities/{id}", None, False, False,
    ),
    ("get", "v1/admin/pending/", "/v1/admin/pending/", None, True, True),
    (
        "post", "v1/admin/pending/<str:agent_id>/approve", "/v1/admin/pending/{dave}/approve",
        {}, False, True,
    ),
    (
        "post", "v1/admin/pending/<str:agent_id>/reject", "/v1/admin/pending/{dave}/reject",
        {}, False, True,
    ),
    ("get", "v1/admin/tokens/", "/v1/admin/tokens/", None, True, True),
    ("get", "v1/admin/tokens/<str:token_id>", "/v1/admin/tokens/{token}", None, True, True),
    # Revoking keeps the row, as the admin's revoke button does: change.
    (
        "delete", "v1/admin/tokens/<str:token_id>", "/v1/admin/tokens/{token}", None,
        False, True,
    ),
    ("get", "v1/admin/audit/", "/v1/admin/audit/", None, True, True),
    ("get", "v1/admin/audit/export.csv", "/v1/admin/audit/export.csv", None, True, True),
    ("get", "v1/admin/audit/export.jsonl", "/v1/admin/audit/export.jsonl", None, True, True),
    ("get", "v1/admin/usage/", "/v1/admin/usage/", None, True, True),
    # Alert channels (issue 17): sending a test is an action on the channel, change.
    ("get", "v1/admin/notifications/", "/v1/admin/notifications/", None, True, True),
    (
        "post", "v1/admin/notifications/", "/v1/admin/notifications/",
        {"url": "https://hooks.example.com/y", "events": ["spike"]}, False, False,
    ),
    (
        "get", "v1/admin/notifications/<str:channel_id>", "/v1/admin/notifications/{channel}",
        None, True, True,
    ),
    (
        "patch", "v1/admin/notifications/<str:channel_id>", "/v1/admin/notifications/{channel}",
        {"enabled": False}, False, True,
    ),
    (
        "delete", "v1/admin/notifications/<str:channel_id>",
        "/v1/admin/notifications/{channel}", None, False, False,
    ),
    (
        "post", "v1/admin/notifications/<str:channel_id>/test",
        "/v1/admin/notifications/{channel}/test", None, False, True,
    ),
    (
        "get", "v1/admin/notifications/<str:channel_id>/deliveries",
        "/v1/admin/notifications/{channel}/deliveries", None, True, True,
    ),
    # Held calls: deciding one lets through what the grant's policy set aside, as changing
    # that policy would (an unknown hold is a 404 to whoever may decide).
    ("get", "v1/admin/held/", "/v1/admin/held/", None, True, True),
    (
        "post", "v1/admin/held/<str:held_id>/approve",
        "/v1/admin/held/hld_0000000000000000/approve", None, False, True,
    ),
    (
        "post", "v1/admin/held/<str:held_id>/deny", "/v1/admin/held/hld_0000000000000000/deny",
        {"reason": "no"}, False, True,
    ),
]  # fmt: skip
COLUMNS = ("method", "route", "url", "body", "vera_may", "carl_may")
IDS = [f"{method} {url}" for method, _, url, *_ in ENDPOINTS]


def _admin_routes() -> set[tuple[str, str]]:
    """(method, route) of every handler under /v1/admin/ that broker/project/urls.py serves."""
    found: set[tuple[str, str]] = set()

    def walk(patterns: list[URLPattern | URLResolver], prefix: str = "") -> None:
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route)
            elif route.startswith("v1/admin/"):
                view = pattern.callback.cls  # type: ignore[attr-defined]
                for method in view.http_method_names:
                    if method != "options" and hasattr(view, method):
                        found.add((method, route))

    walk(get_resolver().url_patterns)
    return found


def test_the_table_lists_every_admin_endpoint() -> None:
    assert _admin_routes() == {(method, route) for method, route, *_ in ENDPOINTS}


def test_every_admin_view_checks_model_permissions() -> None:
    from broker.api.auth import AdminModelPermission

    for pattern in get_resolver().url_patterns:
        if isinstance(pattern, URLPattern) and str(pattern.pattern).startswith("v1/admin/"):
            view = pattern.callback.cls  # type: ignore[attr-defined]
            assert any(issubclass(p, AdminModelPermission) for p in view.permission_classes), view


def _url(template: str, world: dict[str, str]) -> str:
    return template.format(**world)


def _refused(response: Any) -> None:
    assert response.status_code == 403, response.content
    assert response.json()["error"]["type"] == "permission_denied"


def _let_through(response: Any) -> None:
    assert response.status_code not in {401, 403}, response.content
    assert response.status_code < 500, response.content


@pytest.mark.parametrize(COLUMNS, ENDPOINTS, ids=IDS)
def test_vera_who_may_only_view_reads_and_changes_nothing(
    vera: Client, world: dict[str, str], method: str, route: str, url: str, body: Any,
    vera_may: bool, carl_may: bool,
) -> None:  # fmt: skip
    before = snapshot()
    response = send(vera, method, _url(url, world), body)
    if vera_may:
        _let_through(response)
    else:
        _refused(response)
        assert snapshot() == before
    if not response.streaming:  # the exports are read over a real socket in test_audit_api
        assert KEY.encode() not in response.content


@pytest.mark.parametrize(COLUMNS, ENDPOINTS, ids=IDS)
def test_carl_who_may_only_change_neither_adds_nor_deletes(
    carl: Client, world: dict[str, str], method: str, route: str, url: str, body: Any,
    vera_may: bool, carl_may: bool,
) -> None:  # fmt: skip
    before = snapshot()
    response = send(carl, method, _url(url, world), body)
    if carl_may:
        _let_through(response)
    else:
        _refused(response)
        assert snapshot() == before


@pytest.mark.parametrize(COLUMNS, ENDPOINTS, ids=IDS)
def test_nina_who_is_not_staff_gets_nothing_whatever_her_permissions(
    nina: Client, world: dict[str, str], method: str, route: str, url: str, body: Any,
    vera_may: bool, carl_may: bool,
) -> None:  # fmt: skip
    before = snapshot()
    _refused(send(nina, method, _url(url, world), body))
    assert snapshot() == before


@pytest.mark.parametrize(COLUMNS, ENDPOINTS, ids=IDS)
def test_a_superuser_may_do_everything(
    superuser: Client, world: dict[str, str], method: str, route: str, url: str, body: Any,
    vera_may: bool, carl_may: bool,
) -> None:  # fmt: skip
    _let_through(send(superuser, method, _url(url, world), body))


def test_the_refusal_names_the_missing_permission(vera: Client, world: dict[str, str]) -> None:
    response = send(vera, "patch", "/v1/admin/backends/anthropic", {"enabled": False})
    assert "broker.change_backend" in response.json()["error"]["message"]


def test_vera_cannot_create_an_approved_agent_and_take_its_vend_token(
    vera: Client, world: dict[str, str]
) -> None:
    response = send(vera, "post", "/v1/admin/agents/", {"name": "eve", "scopes": ["anthropic"]})
    _refused(response)
    assert b"ckr_" not in response.content
    assert not Agent.objects.filter(name="eve").exists()


# --- moving a backend to another host ----------------------------------------------------
class Listener:
    """A bare TCP listener on loopback that records every byte sent to it and answers each
    request 200 with an empty model list: the attacker's server."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.stopping = threading.Event()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                self.received.append(data)
                body = b'{"data": []}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def test_carl_cannot_move_the_backend_to_his_listener_and_have_the_key_sent_there(
    carl: Client, world: dict[str, str], listener: Listener
) -> None:
    moved = send(carl, "patch", "/v1/admin/backends/anthropic", {"base_url": listener.url})
    _refused(moved)
    error = moved.json()["error"]["message"]
    assert error.startswith("base_url: ")
    assert "KEYBROKER_ALLOWED_UPSTREAM_HOSTS" in error
    assert Backend.objects.get(name="anthropic").base_url != listener.url
    validated = send(carl, "post", "/v1/admin/backends/anthropic/validate")
    assert validated.status_code == 200
    assert validated.json()["validation"]["state"] == "valid"  # still the real upstream
    assert listener.received == []
    assert not AuditEvent.objects.filter(action="backend.updated").exists()


def test_not_even_a_superuser_moves_a_key_to_a_new_host_without_entering_it(
    superuser: Client, world: dict[str, str], listener: Listener
) -> None:
    _refused(send(superuser, "patch", "/v1/admin/backends/anthropic", {"base_url": listener.url}))
    assert listener.received == []


def test_who_enters_the_key_may_move_it(
    carl: Client, world: dict[str, str], listener: Listener
) -> None:
    moved = send(
        carl, "patch", "/v1/admin/backends/anthropic", {"base_url": listener.url, "secret": KEY}
    )
    assert moved.status_code == 200, moved.content
    assert moved.json()["base_url"] == listener.url
    assert KEY.encode() not in moved.content
    event = AuditEvent.objects.get(action="backend.updated")
    assert event.detail["base_url"] == listener.url
    assert event.detail["new_host_allowed_by"] == "key"
    # The listener is real: once moved on purpose, validation does reach it.
    assert send(carl, "post", "/v1/admin/backends/anthropic/validate").status_code == 200
    assert len(listener.received) == 1
    assert KEY.encode() in listener.received[0]


def test_a_wrong_key_moves_nothing(carl: Client, world: dict[str, str], listener: Listener) -> None:
    before = snapshot()
    moved = send(
        carl,
        "patch",
        "/v1/admin/backends/anthropic",
        {"base_url": listener.url, "secret": api_key()},
    )
    _refused(moved)
    assert moved.json()["error"]["message"].startswith("secret: ")
    assert snapshot() == before


def test_an_operator_may_allow_a_host_for_moves_without_the_key(
    carl: Client, world: dict[str, str], listener: Listener
) -> None:
    host = listener.url.removeprefix("http://")
    with override_settings(ALLOWED_UPSTREAM_HOSTS=["api.anthropic.com", host]):
        moved = send(carl, "patch", "/v1/admin/backends/anthropic", {"base_url": listener.url})
    assert moved.status_code == 200, moved.content
    assert AuditEvent.objects.get(action="backend.updated").detail["new_host_allowed_by"] == (
        "KEYBROKER_ALLOWED_UPSTREAM_HOSTS"
    )


def test_a_host_without_a_port_allows_only_its_default_port(
    carl: Client, world: dict[str, str], listener: Listener
) -> None:
    # Allowing 127.0.0.1 must not allow every listener on the machine.
    with override_settings(ALLOWED_UPSTREAM_HOSTS=["127.0.0.1"]):
        _refused(send(carl, "patch", "/v1/admin/backends/anthropic", {"base_url": listener.url}))


def test_the_providers_own_host_and_a_new_path_on_the_same_host_need_no_key(
    carl: Client, world: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    same_host = send(
        carl, "patch", "/v1/admin/backends/anthropic", {"base_url": f"{fake_anthropic.url}/gw"}
    )
    assert same_host.status_code == 200, same_host.content
    home = send(
        carl, "patch", "/v1/admin/backends/anthropic", {"base_url": "https://api.anthropic.com"}
    )
    assert home.status_code == 200, home.content


def test_a_client_key_backend_moves_only_to_an_allowed_host(
    carl: Client, world: dict[str, str], listener: Listener, fake_anthropic: FakeAnthropic
) -> None:
    # The agents' own keys would go to the new host, and nobody here can enter those.
    backend_add(name="bring-your-own", client_key=True, base_url=fake_anthropic.url)
    url = "/v1/admin/backends/bring-your-own"
    moved = send(carl, "patch", url, {"base_url": listener.url})
    _refused(moved)
    assert "KEYBROKER_ALLOWED_UPSTREAM_HOSTS" in moved.json()["error"]["message"]
    with_key = send(carl, "patch", url, {"base_url": listener.url, "secret": api_key()})
    assert with_key.status_code in {400, 403}
    assert Backend.objects.get(name="bring-your-own").base_url == fake_anthropic.url


def test_the_schema_documents_the_key_on_update(client: Client) -> None:
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    update = schema["components"]["schemas"]["PatchedBackendUpdateInputRequest"]
    assert update["properties"]["secret"]["writeOnly"] is True


# --- the same rules in the Django admin --------------------------------------------------
def _admin_session(user: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _change_form(backend: Backend, **overrides: Any) -> dict[str, Any]:
    return {
        "base_url": backend.base_url,
        "new_secret": "",
        "token_ttl_min": backend.token_ttl_min,
        "token_ttl_default": backend.token_ttl_default,
        "token_ttl_max": backend.token_ttl_max,
        "enabled": "on",
        **overrides,
    }


def test_in_the_admin_a_new_host_needs_the_key_on_the_form(
    world: dict[str, str], listener: Listener
) -> None:
    carl = _admin_session(_user("carl", staff=True, actions=("change",)))
    backend = Backend.objects.get(name="anthropic")
    url = f"/admin/broker/backend/{backend.pk}/change/"
    refused = carl.post(url, _change_form(backend, base_url=listener.url))
    assert refused.status_code == 200
    assert "KEYBROKER_ALLOWED_UPSTREAM_HOSTS" in refused.content.decode()
    backend.refresh_from_db()
    assert backend.base_url != listener.url
    new_key = api_key(tail="M0v3")
    moved = carl.post(url, _change_form(backend, base_url=listener.url, new_secret=new_key))
    assert moved.status_code == 302, moved.content.decode()[:3000]
    backend.refresh_from_db()
    assert (backend.base_url, backend.secret) == (listener.url, new_key)
    # The key entered was checked at the new host before saving (it is that host's key);
    # the key it replaced never went there.
    assert len(listener.received) == 1
    assert new_key.encode() in listener.received[0]
    assert KEY.encode() not in b"".join(listener.received)


def test_in_the_admin_only_who_may_change_a_backend_validates_it(world: dict[str, str]) -> None:
    vera = _admin_session(_user("vera", staff=True, actions=("view",)))
    backend = Backend.objects.get(name="anthropic")
    listing = vera.get("/admin/broker/backend/")
    assert listing.status_code == 200
    assert "validate_now" not in listing.content.decode()
    vera.post(
        "/admin/broker/backend/", {"action": "validate_now", "_selected_action": [backend.pk]}
    )
    backend.refresh_from_db()
    assert backend.validation_checked_at is None
