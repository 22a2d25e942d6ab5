"""A backend's pool as an admin sees and changes it (issue 15): `backend inspect` and the
REST backend list each key, and the backend's admin page rotates one key of the pool."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.core.management import call_command
from django.test import Client

from audit.models import AuditEvent
from broker.celery import app as celery_app
from broker.infra.redis import redis_client
from broker.models import Backend
from broker.selectors.backend_keys import key_cooldown_name, keys_of
from broker.services.backend_keys import key_add, key_disable
from broker.services.backends import VALIDATE_TASK, backend_add
from broker.tasks import backend_validate_task
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = pytest.mark.django_db


def inspect(*args: str) -> str:
    out = io.StringIO()
    call_command("backend", "inspect", *args, stdout=out)
    return out.getvalue()


def a_pool_of_two() -> tuple[Backend, str, str]:
    """anthropic with keys …Ins1 (weight 1) and …Ins2 (weight 3, disabled, cooling)."""
    first, second = api_key(tail="Ins1"), api_key(tail="Ins2")
    backend = backend_add(name="anthropic", secret=first)
    key_disable(key=key_add(backend=backend, secret=second, weight=3))
    redis_client().set(
        key_cooldown_name("anthropic", "sk-ant-api03-…Ins2"), f"{time.time() + 90}", ex=90
    )
    return backend, first, second


def test_inspect_lists_each_key_of_the_pool_and_never_a_secret() -> None:
    _, first, second = a_pool_of_two()
    shown = inspect("anthropic")
    assert "fingerprint  sk-ant-api03-…Ins1" in shown.splitlines()  # the first enabled key
    pool = shown.split("\nkeys         ", 1)[1].splitlines()[:2]
    assert [line.split()[:6] for line in pool] == [
        ["sk-ant-api03-…Ins1", "unknown", "weight", "1", "enabled", "ok"],
        ["sk-ant-api03-…Ins2", "unknown", "weight", "3", "disabled", "cooling"],
    ]
    assert pool[1].startswith(" " * 13)  # under the first, in the same column
    as_json = json.loads(inspect("anthropic", "--json"))
    assert [
        (
            k["fingerprint"],
            k["weight"],
            k["enabled"],
            k["validation"]["state"],
            k["health"]["state"],
        )
        for k in as_json["keys"]
    ] == [
        ("sk-ant-api03-…Ins1", 1, True, "unknown", "ok"),
        ("sk-ant-api03-…Ins2", 3, False, "unknown", "cooling"),
    ]
    assert as_json["keys"][1]["health"]["until"] > time.time()
    for output in (shown, json.dumps(as_json)):
        assert first not in output
        assert second not in output
        assert first[13:40] not in output


def test_inspect_says_a_keyless_backend_stores_none() -> None:
    backend_add(name="team", client_key=True)
    assert "keys         none stored" in inspect("team").splitlines()
    assert json.loads(inspect("team", "--json"))["keys"] == []


def test_the_rest_backend_lists_its_keys(admin_api: Client) -> None:
    _, first, second = a_pool_of_two()
    one = admin_api.get("/v1/admin/backends/anthropic")
    listed = admin_api.get("/v1/admin/backends/")
    assert one.status_code == listed.status_code == 200
    for backend in (one.json(), listed.json()[0]):
        assert [
            (k["fingerprint"], k["enabled"], k["health"]["state"]) for k in backend["keys"]
        ] == [
            ("sk-ant-api03-…Ins1", True, "ok"),
            ("sk-ant-api03-…Ins2", False, "cooling"),
        ]
    for response in (one, listed):
        assert first.encode() not in response.content
        assert second.encode() not in response.content


def test_the_openapi_schema_describes_the_backends_keys() -> None:
    schema = Client().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    keys = schema["components"]["schemas"]["BackendOutput"]["properties"]["keys"]
    assert keys["items"]["$ref"].endswith("/PoolKeyOutput")
    shown = set(schema["components"]["schemas"]["PoolKeyOutput"]["properties"])
    assert {"fingerprint", "weight", "enabled", "validation", "health"} <= shown
    assert "secret" not in shown


# Rotating one key of the pool from the backend's admin page.

PAGE = "/admin/broker/backend/{}/change/"


def form(backend: Backend, **changes: Any) -> dict[str, Any]:
    """The change form as the page posts it, with ``changes``."""
    return {
        "base_url": backend.base_url, "token_ttl_min": backend.token_ttl_min,
        "token_ttl_default": backend.token_ttl_default,
        "token_ttl_max": backend.token_ttl_max, "enabled": "on", "add_key_weight": 1,
        **changes,
    }  # fmt: skip


@pytest.fixture
def alice_admin(alice: AbstractBaseUser) -> Client:
    admin = Client()
    admin.force_login(alice)
    return admin


def test_alice_rotates_one_key_of_the_pool_and_it_is_validated(
    alice_admin: Client, fake_anthropic: FakeAnthropic, django_capture_on_commit_callbacks: Any
) -> None:
    backend = backend_add(
        name="anthropic", secret=api_key(tail="Rot1"), base_url=fake_anthropic.url
    )
    key_add(backend=backend, secret=api_key(tail="Rot2"), weight=4)
    new = api_key(tail="Rot9")
    fake_anthropic.valid_keys.add(new)
    page = PAGE.format(backend.pk)
    shown = alice_admin.get(page).content.decode()
    assert '<option value="sk-ant-api03-…Rot2">sk-ant-api03-…Rot2</option>' in shown
    # The worker's task, run here as the rotation's transaction commits.
    assert backend_validate_task.name == VALIDATE_TASK
    celery_app.conf.task_always_eager = True
    try:
        with django_capture_on_commit_callbacks(execute=True):
            saved = alice_admin.post(
                page,
                form(backend, new_secret=new, rotate_fingerprint="sk-ant-api03-…Rot2"),
            )
    finally:
        celery_app.conf.task_always_eager = False
    assert saved.status_code == 302, saved.content.decode()[:3000]
    keys = keys_of(backend)
    assert [(k.fingerprint, k.weight, k.position) for k in keys] == [
        ("sk-ant-api03-…Rot1", 1, 0),
        ("sk-ant-api03-…Rot9", 4, 1),  # its place and weight stay
    ]
    assert keys[1].secret == new
    # Validated like an added key: that key alone, against the upstream, at once.
    assert [k.validation_state for k in keys] == ["unknown", "valid"]
    assert [seen.headers["x-api-key"] for seen in fake_anthropic.requests] == [new]
    rotated = AuditEvent.objects.get(action="backend.rotated")
    assert (rotated.actor, rotated.detail) == (
        "alice",
        {"old_fingerprint": "sk-ant-api03-…Rot2", "fingerprint": "sk-ant-api03-…Rot9"},
    )
    after = alice_admin.get(page).content.decode()
    assert "sk-ant-api03-…Rot9" in after
    assert new not in after


BAD_ROTATIONS = [
    ({"new_secret": "REPLACED"}, "rotate_fingerprint", "name the one to replace"),
    (
        {"new_secret": "not-a-key", "rotate_fingerprint": "sk-ant-api03-…Rot2"},
        "new_secret",
        "",
    ),
    (
        {"new_secret": "DUPLICATE", "rotate_fingerprint": "sk-ant-api03-…Rot2"},
        "new_secret",
        "already has a key sk-ant-api03-…Rot1",
    ),
    (
        {"new_secret": "REPLACED", "rotate_fingerprint": "sk-ant-api03-…Gone"},
        "rotate_fingerprint",
        "Select a valid choice",
    ),
]


@pytest.mark.parametrize(("changes", "field", "words"), BAD_ROTATIONS)
def test_a_rotation_the_service_refuses_shows_on_its_field_and_changes_nothing(
    alice_admin: Client, changes: dict[str, str], field: str, words: str
) -> None:
    first = api_key(tail="Rot1")
    backend = backend_add(name="anthropic", secret=first)
    key_add(backend=backend, secret=api_key(tail="Rot2"))
    secret = {"REPLACED": api_key(tail="Rot9"), "DUPLICATE": first}.get(
        changes["new_secret"], changes["new_secret"]
    )
    before = [(k.fingerprint, k.secret) for k in keys_of(backend)]
    events = AuditEvent.objects.count()
    posted = form(backend, **{**changes, "new_secret": secret})
    refused = alice_admin.post(PAGE.format(backend.pk), posted)
    assert refused.status_code == 200
    errors = refused.context["adminform"].form.errors
    assert field in errors, errors
    assert words in " ".join(errors[field])
    assert secret not in refused.content.decode()
    assert [(k.fingerprint, k.secret) for k in keys_of(backend)] == before
    assert AuditEvent.objects.count() == events


def test_with_one_key_the_secret_replaces_it_without_a_choice(alice_admin: Client) -> None:
    backend = backend_add(name="anthropic", secret=api_key(tail="One1"))
    page = PAGE.format(backend.pk)
    assert (
        '<option value="" selected>the only key</option>' in alice_admin.get(page).content.decode()
    )
    saved = alice_admin.post(page, form(backend, new_secret=api_key(tail="One2")))
    assert saved.status_code == 302
    assert [k.fingerprint for k in keys_of(backend)] == ["sk-ant-api03-…One2"]


def test_a_viewer_can_neither_rotate_nor_press_a_keys_buttons() -> None:
    backend = backend_add(name="anthropic", secret=api_key(tail="Vw01"))
    key = key_add(backend=backend, secret=api_key(tail="Vw02"))
    viewer = get_user_model().objects.create_user("vic", password="pw-vic-123", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_backend"))
    vic = Client()
    vic.force_login(viewer)
    page = PAGE.format(backend.pk)
    rotate = form(backend, new_secret=api_key(), rotate_fingerprint="sk-ant-api03-…Vw02")
    assert vic.post(page, rotate).status_code == 403
    assert vic.post(f"{page}keys/{key.pk}/disable/").status_code == 403
    assert [(k.fingerprint, k.enabled) for k in keys_of(backend)] == [
        ("sk-ant-api03-…Vw01", True),
        ("sk-ant-api03-…Vw02", True),
    ]


def test_a_keys_buttons_answer_post_only_and_name_their_backend(alice_admin: Client) -> None:
    backend = backend_add(name="anthropic", secret=api_key(tail="Btn1"))
    key = key_add(backend=backend, secret=api_key(tail="Btn2"))
    page = PAGE.format(backend.pk)
    assert alice_admin.get(f"{page}keys/{key.pk}/disable/").status_code == 405
    assert (
        alice_admin.post(f"{PAGE.format(backend.pk + 99)}keys/{key.pk}/disable/").status_code == 404
    )
    assert all(k.enabled for k in keys_of(backend))
