from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.test import override_settings

from audit.models import AuditEvent
from broker.celery import app as celery_app
from broker.infra.errors import Conflict, ServiceError
from broker.models import Backend, BackendKey, SigningKey, Token, ValidationState
from broker.services.agents import agent_enroll
from broker.services.backends import (
    TtlBounds,
    backend_add,
    backend_remove,
    backend_rotate,
    backend_update,
    backend_validate,
)
from broker.services.oidc import signing_key_current
from broker.services.tokens import token_issue
from broker.tasks import backends_validate_all
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key, oauth_token

pytestmark = pytest.mark.django_db


def raw_secret_column() -> list[bytes]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT secret FROM broker_backendkey")  # a pool's keys (issue 15)
        return [bytes(row[0]) for row in cursor.fetchall()]


def test_it_stores_the_secret_encrypted_with_a_fingerprint() -> None:
    key = api_key(tail="Xy9Q")
    backend = backend_add(name="anthropic", secret=key)
    assert backend.secret_fingerprint == "sk-ant-api03-…Xy9Q"
    assert backend.auth_scheme == "x-api-key"
    assert backend.base_url == "https://api.anthropic.com"
    assert (backend.token_ttl_min, backend.token_ttl_default, backend.token_ttl_max) == (
        60,
        600,
        3600,
    )
    (raw,) = raw_secret_column()
    assert key.encode() not in raw
    assert key[13:40].encode() not in raw
    assert Backend.objects.get().secret == key
    assert key not in repr(backend)


def test_an_oauth_token_goes_upstream_as_bearer() -> None:
    backend = backend_add(name="claude-max", secret=oauth_token(tail="Oa7T"))
    assert backend.auth_scheme == "bearer"
    assert backend.secret_fingerprint == "sk-ant-oat01-…Oa7T"


BAD_INPUT: list[tuple[dict[str, Any], str]] = [
    ({"kind": "cohere"}, "kind: unknown kind 'cohere'"),
    ({"name": "Anthropic"}, "name: use 1-63 lowercase"),
    ({"name": "-lead"}, "name: use 1-63 lowercase"),
    ({"name": "x" * 64}, "name: use 1-63 lowercase"),
    ({"name": ""}, "name: use 1-63 lowercase"),
    ({"secret": ""}, "secret: must not be empty"),
    ({"secret": "   "}, "secret: must not be empty"),
    ({"secret": "hunter2-not-a-key"}, "secret: an Anthropic secret is an API key"),
    ({"base_url": "http://api.example.com"}, "base_url: must use https://"),
    ({"base_url": "ftp://api.example.com"}, "base_url: must be an https:// URL"),
    ({"base_url": "https://user:pw@api.example.com"}, "base_url: must not carry credentials"),
    ({"base_url": "https://api.example.com:99999"}, "base_url: not a valid URL"),
    ({"ttl": TtlBounds(minimum=600, maximum=60, default=300)}, "ttl: token TTL bounds"),
    ({"ttl": TtlBounds(minimum=0, maximum=60, default=30)}, "ttl: token TTL bounds"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUT)
def test_bad_input_is_refused_and_nothing_is_saved(override: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"name": "anthropic", "secret": api_key(), **override}
    with pytest.raises(ServiceError) as refused:
        backend_add(**arguments)
    assert refused.value.message.startswith(message), refused.value.message
    assert Backend.objects.count() == 0
    assert AuditEvent.objects.count() == 0


def test_a_duplicate_name_is_a_conflict() -> None:
    backend_add(name="anthropic", secret=api_key())
    with pytest.raises(Conflict):
        backend_add(name="anthropic", secret=api_key())
    assert Backend.objects.count() == 1


def test_loopback_http_is_allowed_for_local_upstreams() -> None:
    backend = backend_add(name="local", secret=api_key(), base_url="http://127.0.0.1:9/")
    assert backend.base_url == "http://127.0.0.1:9"


@pytest.fixture
def local_backend(fake_anthropic: FakeAnthropic) -> Callable[..., Backend]:
    def make(secret: str | None = None, name: str = "anthropic") -> Backend:
        return backend_add(name=name, secret=secret or api_key(), base_url=fake_anthropic.url)

    return make


def test_a_working_key_is_valid(
    fake_anthropic: FakeAnthropic, local_backend: Callable[..., Backend]
) -> None:
    key = api_key()
    fake_anthropic.valid_keys.add(key)
    backend = local_backend(key)
    result = backend_validate(backend=backend)
    assert result.state == ValidationState.VALID
    backend.refresh_from_db()
    assert backend.validation_state == "valid"
    assert backend.validation_checked_at is not None
    (seen,) = fake_anthropic.requests
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    assert seen.headers["x-api-key"] == key
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert AuditEvent.objects.filter(action="backend.validated", backend="anthropic").exists()


def test_an_oauth_token_is_validated_as_bearer_with_the_beta_flag(
    fake_anthropic: FakeAnthropic, local_backend: Callable[..., Backend]
) -> None:
    token = oauth_token()
    fake_anthropic.valid_keys.add(token)
    backend = local_backend(token)
    assert backend_validate(backend=backend).state == ValidationState.VALID
    (seen,) = fake_anthropic.requests
    assert seen.headers["authorization"] == f"Bearer {token}"
    assert "oauth-2025-04-20" in seen.headers["anthropic-beta"]
    assert "x-api-key" not in seen.headers


def test_a_rejected_key_is_invalid_with_the_upstream_reason(
    fake_anthropic: FakeAnthropic, local_backend: Callable[..., Backend]
) -> None:
    backend = local_backend()
    result = backend_validate(backend=backend)
    assert result.state == ValidationState.INVALID
    assert result.message == "upstream answered 401 (authentication_error: invalid x-api-key)"
    event = AuditEvent.objects.get(action="backend.invalid")
    assert event.message == result.message


def test_a_forbidden_key_is_invalid(
    fake_anthropic: FakeAnthropic, local_backend: Callable[..., Backend]
) -> None:
    key = api_key()
    fake_anthropic.forbidden_keys.add(key)
    result = backend_validate(backend=local_backend(key))
    assert result.state == ValidationState.INVALID
    assert result.message.startswith("upstream answered 403 (permission_error: ")


@override_settings(BACKEND_VALIDATE_TIMEOUT_SECONDS=1)
def test_a_hanging_upstream_is_unreachable(
    fake_anthropic: FakeAnthropic, local_backend: Callable[..., Backend]
) -> None:
    fake_anthropic.hang_seconds = 3
    result = backend_validate(backend=local_backend())
    assert result.state == ValidationState.UNREACHABLE
    assert result.message.endswith("did not answer within 1s")


def test_an_upstream_that_is_down_is_unreachable() -> None:
    backend = backend_add(name="down", secret=api_key(), base_url=f"http://127.0.0.1:{free_port()}")
    result = backend_validate(backend=backend)
    assert result.state == ValidationState.UNREACHABLE
    assert result.message.startswith("cannot reach 127.0.0.1:")
    assert Backend.objects.get().validation_state == "unreachable"


def test_rotation_keeps_the_backend_and_the_next_call_uses_the_new_key(
    fake_anthropic: FakeAnthropic, local_backend: Callable[..., Backend]
) -> None:
    old_key, new_key = api_key(tail="0ld1"), api_key(tail="N3w2")
    fake_anthropic.valid_keys.update({old_key, new_key})
    backend = local_backend(old_key)
    backend_validate(backend=backend)
    backend = backend_rotate(backend=Backend.objects.get(), secret=new_key)
    assert backend.pk == Backend.objects.get().pk
    assert backend.secret_fingerprint.endswith("N3w2")
    assert backend.rotated_at is not None
    assert backend.validation_state == "unknown"
    backend_validate(backend=Backend.objects.get())
    assert fake_anthropic.requests[-1].headers["x-api-key"] == new_key
    assert Backend.objects.get().secret == new_key
    rotated = AuditEvent.objects.get(action="backend.rotated")
    assert rotated.detail == {
        "old_fingerprint": "sk-ant-api03-…0ld1",
        "fingerprint": "sk-ant-api03-…N3w2",
    }


def test_a_result_for_a_secret_rotated_meanwhile_is_dropped(
    fake_anthropic: FakeAnthropic, local_backend: Callable[..., Backend]
) -> None:
    stale = local_backend()
    backend_rotate(backend=Backend.objects.get(), secret=api_key())
    backend_validate(backend=stale)
    assert Backend.objects.get().validation_state == "unknown"


def test_adding_queues_validation_that_a_worker_runs(
    fake_anthropic: FakeAnthropic, django_capture_on_commit_callbacks: Any
) -> None:
    key = api_key()
    fake_anthropic.valid_keys.add(key)
    celery_app.conf.task_always_eager = True
    try:
        with django_capture_on_commit_callbacks() as callbacks:
            backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
        # Nothing is validated before the row is committed...
        assert Backend.objects.get().validation_state == "unknown"
        for callback in callbacks:
            callback()
    finally:
        celery_app.conf.task_always_eager = False
    # ...and then the worker's task does it.
    assert Backend.objects.get().validation_state == "valid"


def test_the_schedule_validates_every_enabled_backend(fake_anthropic: FakeAnthropic) -> None:
    good = api_key()
    fake_anthropic.valid_keys.add(good)
    backend_add(name="good", secret=good, base_url=fake_anthropic.url)
    backend_add(name="bad", secret=api_key(), base_url=fake_anthropic.url)
    off = backend_add(name="off", secret=good, base_url=fake_anthropic.url)
    backend_update(backend=off, enabled=False)
    celery_app.conf.task_always_eager = True
    try:
        backends_validate_all.delay()
    finally:
        celery_app.conf.task_always_eager = False
    states = dict(Backend.objects.values_list("name", "validation_state"))
    assert states == {"good": "valid", "bad": "invalid", "off": "unknown"}


def test_rotate_encryption_key_re_encrypts_every_secret(tmp_path: Path, settings: Any) -> None:
    from django.core.management import call_command

    key_a, key_b = api_key(), oauth_token()
    backend_add(name="a", secret=key_a)
    backend_add(name="b", secret=key_b)
    signing_pem = signing_key_current().private_pem
    before = raw_secret_column()
    key_file = tmp_path / "encryption_key"
    key_file.write_text(settings.ENCRYPTION_KEY + "\n")
    settings.ENCRYPTION_KEY_PATH = key_file
    call_command("rotate_encryption_key", stdout=open("/dev/null", "w"))  # noqa: SIM115
    new_key = key_file.read_text().strip()
    assert new_key != settings.ENCRYPTION_KEY
    assert key_file.stat().st_mode & 0o777 == 0o600
    after = raw_secret_column()
    assert set(before).isdisjoint(after)
    settings.ENCRYPTION_KEY = new_key
    assert dict(BackendKey.objects.values_list("backend__name", "secret")) == {
        "a": key_a,
        "b": key_b,
    }
    assert SigningKey.objects.get().private_pem == signing_pem


def test_an_update_that_changes_nothing_records_nothing() -> None:
    backend = backend_add(name="anthropic", secret=api_key())
    backend_update(backend=backend, ttl=TtlBounds(), enabled=True, base_url=backend.base_url)
    assert not AuditEvent.objects.filter(action="backend.updated").exists()
    backend_update(backend=backend, ttl=TtlBounds(minimum=30, maximum=900, default=300))
    event = AuditEvent.objects.get(action="backend.updated")
    assert event.detail == {"ttl": [30, 300, 900]}


def test_removal_refuses_while_tokens_live_and_forced_removal_revokes_them(
    alice: AbstractBaseUser,
) -> None:
    backend = backend_add(name="anthropic", secret=api_key())
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    token_issue(agent=bob, backend_name="anthropic")

    with pytest.raises(Conflict, match="1 live token"):
        backend_remove(backend=backend)
    assert Backend.objects.filter(name="anthropic").exists()

    backend_remove(backend=backend, force=True)
    assert not Backend.objects.exists()
    assert not Token.objects.exists()
    revoked = AuditEvent.objects.get(action="token.revoked")
    assert revoked.message == "backend removed"
    assert AuditEvent.objects.get(action="backend.removed").detail["revoked"] == 1
