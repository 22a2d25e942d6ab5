"""A backend's pool of keys (issue 15): the domain's rules, the migration that made every
backend's key a pool of one, and the proxy's choice and failover against the fake upstream."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any
from unittest import mock
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client

from audit.models import AuditEvent
from broker.celery import app as celery_app
from broker.infra.errors import Conflict, NotFound, ServiceError
from broker.models import Backend, BackendKey, Grant, ValidationState
from broker.selectors.backend_keys import key_get, keys_enabled, keys_of
from broker.services.admin_tokens import admintoken_create
from broker.services.backend_keys import key_add, key_disable, key_enable, key_remove, key_update
from broker.services.backends import (
    VALIDATE_TASK,
    backend_add,
    backend_rotate,
    backend_validate,
)
from broker.services.policy import grant_update
from broker.tasks import backend_validate_task, backends_validate_all
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key, oauth_token
from tests.proxy_cast import Proxied, audit_drained


@pytest.mark.django_db
def test_a_backend_starts_with_a_pool_of_one_and_grows_in_order() -> None:
    first, second = api_key(tail="One1"), oauth_token(tail="Two2")
    backend = backend_add(name="anthropic", secret=first)
    (only,) = keys_of(backend)
    assert (only.fingerprint, only.auth_scheme, only.weight, only.enabled) == (
        "sk-ant-api03-…One1",
        "x-api-key",
        1,
        True,
    )
    added = key_add(backend=backend, secret=second, weight=3)
    assert [k.fingerprint for k in keys_of(backend)] == ["sk-ant-api03-…One1", "sk-ant-oat01-…Two2"]
    assert (added.auth_scheme, added.weight) == ("bearer", 3)
    assert BackendKey.objects.get(pk=added.pk).secret == second
    event = AuditEvent.objects.get(action="backend.key_added")
    assert event.detail == {"fingerprint": "sk-ant-oat01-…Two2", "weight": 3}
    assert second not in str(event.detail)
    assert second[13:40] not in repr(added)


@pytest.mark.django_db
def test_a_key_already_in_the_pool_or_a_bad_one_is_refused() -> None:
    key = api_key(tail="Same")
    backend = backend_add(name="anthropic", secret=key)
    with pytest.raises(Conflict) as same:
        key_add(backend=backend, secret=key)
    assert same.value.field == "secret"
    with pytest.raises(ServiceError) as bad:
        key_add(backend=backend, secret="not-a-key")
    assert bad.value.field == "secret"
    with pytest.raises(ServiceError) as heavy:
        key_add(backend=backend, secret=api_key(), weight=0)
    assert heavy.value.field == "weight"
    keyless = backend_add(name="team", client_key=True)
    with pytest.raises(ServiceError):
        key_add(backend=keyless, secret=api_key())
    assert keys_of(keyless) == []
    assert len(keys_of(backend)) == 1


@pytest.mark.django_db
def test_the_last_enabled_key_can_be_neither_disabled_nor_removed() -> None:
    backend = backend_add(name="anthropic", secret=api_key(tail="Aaa1"))
    first = key_get(backend=backend, fingerprint="sk-ant-api03-…Aaa1")
    for refused in (key_disable, key_remove):
        with pytest.raises(Conflict) as last:
            refused(key=first)
        assert "last enabled key" in last.value.message
    second = key_add(backend=backend, secret=api_key(tail="Bbb2"))
    key_disable(key=first)
    assert keys_enabled(backend) == [second]
    assert Backend.objects.get().secret_fingerprint == "sk-ant-api03-…Bbb2"
    with pytest.raises(Conflict):
        key_remove(key=second)  # the disabled one does not count
    key_remove(key=first)  # a disabled key can go
    key_enable(key=second)  # already enabled: nothing recorded
    actions = list(
        AuditEvent.objects.filter(action__startswith="backend.key_")
        .order_by("id")
        .values_list("action", "detail__fingerprint")
    )
    assert actions == [
        ("backend.key_added", "sk-ant-api03-…Bbb2"),
        ("backend.key_disabled", "sk-ant-api03-…Aaa1"),
        ("backend.key_removed", "sk-ant-api03-…Aaa1"),
    ]
    with pytest.raises(NotFound):
        key_get(backend=backend, fingerprint="sk-ant-api03-…Aaa1")


@pytest.mark.django_db
def test_rotate_replaces_the_only_key_or_the_one_named() -> None:
    backend = backend_add(name="anthropic", secret=api_key(tail="Old1"))
    backend_rotate(backend=backend, secret=api_key(tail="New1"))
    assert [k.fingerprint for k in keys_of(backend)] == ["sk-ant-api03-…New1"]
    key_add(backend=backend, secret=api_key(tail="Two2"), weight=2)
    with pytest.raises(ServiceError) as unnamed:
        backend_rotate(backend=backend, secret=api_key(tail="New3"))
    assert unnamed.value.field == "fingerprint"
    with pytest.raises(NotFound):
        backend_rotate(backend=backend, secret=api_key(), fingerprint="sk-ant-api03-…None")
    backend_rotate(backend=backend, secret=api_key(tail="New3"), fingerprint="sk-ant-api03-…Two2")
    assert [(k.fingerprint, k.weight) for k in keys_of(backend)] == [
        ("sk-ant-api03-…New1", 1),
        ("sk-ant-api03-…New3", 2),  # its place and weight stay
    ]
    rotated = AuditEvent.objects.filter(action="backend.rotated").order_by("id").last()
    assert rotated is not None
    assert rotated.detail == {
        "old_fingerprint": "sk-ant-api03-…Two2",
        "fingerprint": "sk-ant-api03-…New3",
    }


@pytest.mark.django_db
def test_each_key_is_validated_and_the_backend_is_valid_while_one_is(
    fake_anthropic: FakeAnthropic,
) -> None:
    good, bad = api_key(tail="Good"), api_key(tail="Badd")
    fake_anthropic.valid_keys.add(good)
    backend = backend_add(name="anthropic", secret=bad, base_url=fake_anthropic.url)
    key_add(backend=backend, secret=good)
    result = backend_validate(backend=backend)
    states = {k.fingerprint: k.validation_state for k in keys_of(backend)}
    assert states == {"sk-ant-api03-…Badd": "invalid", "sk-ant-api03-…Good": "valid"}
    assert result.state == ValidationState.VALID
    assert backend.validation_message.startswith("1 of 2 enabled keys valid")
    events = AuditEvent.objects.filter(action__in=["backend.validated", "backend.invalid"])
    assert sorted(events.values_list("action", "detail__fingerprint")) == [
        ("backend.invalid", "sk-ant-api03-…Badd"),
        ("backend.validated", "sk-ant-api03-…Good"),
    ]


@pytest.mark.django_db
def test_an_added_key_is_validated_alone_by_the_worker_once_it_is_committed(
    fake_anthropic: FakeAnthropic, django_capture_on_commit_callbacks: Any
) -> None:
    first, added = api_key(tail="Add1"), api_key(tail="Add2")
    fake_anthropic.valid_keys.update({first, added})
    backend = backend_add(name="anthropic", secret=first, base_url=fake_anthropic.url)
    assert backend_validate_task.name == VALIDATE_TASK  # the task the service queues, by name
    celery_app.conf.task_always_eager = True
    try:
        with django_capture_on_commit_callbacks() as callbacks:
            key_add(backend=backend, secret=added)
        assert [k.validation_state for k in keys_of(backend)] == ["unknown", "unknown"]
        for callback in callbacks:
            callback()
    finally:
        celery_app.conf.task_always_eager = False
    assert [k.validation_state for k in keys_of(backend)] == ["unknown", "valid"]
    assert [seen.headers["x-api-key"] for seen in fake_anthropic.requests] == [added]


@pytest.mark.django_db
def test_the_schedule_validates_each_enabled_key_of_a_pool(fake_anthropic: FakeAnthropic) -> None:
    good, bad, off = api_key(tail="Sch1"), api_key(tail="Sch2"), api_key(tail="Sch3")
    fake_anthropic.valid_keys.update({good, off})
    backend = backend_add(name="anthropic", secret=good, base_url=fake_anthropic.url)
    key_add(backend=backend, secret=bad)
    key_disable(key=key_add(backend=backend, secret=off))
    celery_app.conf.task_always_eager = True
    try:
        backends_validate_all.delay()  # what beat runs every KEYBROKER_VALIDATE_INTERVAL
    finally:
        celery_app.conf.task_always_eager = False
    assert [(k.fingerprint, k.validation_state) for k in keys_of(backend)] == [
        ("sk-ant-api03-…Sch1", "valid"),
        ("sk-ant-api03-…Sch2", "invalid"),
        ("sk-ant-api03-…Sch3", "unknown"),  # disabled: not checked
    ]
    assert sorted(seen.headers["x-api-key"] for seen in fake_anthropic.requests) == sorted(
        [good, bad]
    )
    assert Backend.objects.get().validation_message.startswith("1 of 2 enabled keys valid")


@pytest.mark.django_db
def test_a_weight_change_is_recorded_and_bounded() -> None:
    backend = backend_add(name="anthropic", secret=api_key(tail="Wgt1"))
    (key,) = keys_of(backend)
    key_update(key=key, weight=5)
    assert BackendKey.objects.get().weight == 5
    assert AuditEvent.objects.get(action="backend.key_updated").detail == {
        "fingerprint": "sk-ant-api03-…Wgt1",
        "weight": 5,
    }
    with pytest.raises(ServiceError):
        key_update(key=key, weight=1001)


@pytest.mark.django_db(transaction=True)
def test_the_migration_makes_each_stored_key_a_pool_of_one() -> None:
    executor = MigrationExecutor(connection)
    before = [("broker", "0007_segment_path_globs")]
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    key = api_key(tail="Mig1")
    with connection.cursor() as cursor:
        # The column as it was: sealed by the same field type, with the same box.
        sealed = BackendKey._meta.get_field("secret").get_db_prep_value(key, connection)
        backend_model: Any = old.get_model("broker", "Backend")
        keyed = backend_model.objects.create(
            name="keyed",
            base_url="https://api.anthropic.com",
            secret_fingerprint="sk-ant-api03-…Mig1",
            auth_scheme="x-api-key",
            validation_state="valid",
        )
        cursor.execute("UPDATE broker_backend SET secret = %s WHERE id = %s", [sealed, keyed.pk])
        backend_model.objects.create(
            name="team",
            base_url="https://api.anthropic.com",
            client_key=True,
            secret_fingerprint="(the agent's own key)",
        )
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    (pooled,) = BackendKey.objects.all()
    assert (pooled.backend.name, pooled.secret, pooled.fingerprint) == (
        "keyed",
        key,
        "sk-ant-api03-…Mig1",
    )
    assert (pooled.auth_scheme, pooled.validation_state, pooled.enabled) == (
        "x-api-key",
        "valid",
        True,
    )
    assert Backend.objects.get(name="keyed").secret == key
    assert Backend.objects.get(name="team").keys.count() == 0


# The proxy: a pool of two behind the live server, against the fake upstream.

RATE_LIMITED = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
HELLO = {
    "model": "claude-haiku-4-5",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}


def two_keys(proxied: Proxied, fake: FakeAnthropic, *, weight: int = 1) -> tuple[str, str]:
    """The proxied backend's key and a second one (both valid upstream); their fingerprints."""
    second = api_key(tail="Sec2")
    fake.valid_keys.add(second)
    added = key_add(backend=proxied.backend, secret=second, weight=weight)
    return proxied.backend.secret_fingerprint, added.fingerprint


def call(proxied: Proxied, base_url: str | None = None, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{base_url or proxied.base_url}/v1/messages",
        headers={"x-api-key": proxied.token},
        json={**HELLO, **body},
        timeout=10,
    )


def served_by() -> list[tuple[int | None, str, bool]]:
    audit_drained()
    return [
        (e.status, e.detail.get("key_fingerprint", ""), e.detail.get("retried", False))
        for e in AuditEvent.objects.filter(action="proxy.request").order_by("id")
    ]


@pytest.mark.django_db(transaction=True)
def test_a_rate_limited_key_is_skipped_by_every_call_while_it_cools_down(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    # The first key weighs 1000 to the other's 1: left alone, it would serve nearly every call.
    (only,) = keys_of(proxied.backend)
    key_update(key=only, weight=1000)
    first, second = two_keys(proxied, fake_anthropic)
    fake_anthropic.answer_key(proxied.key, 429, RATE_LIMITED, retry_after="30")
    answers = [call(proxied) for _ in range(8)]
    assert [a.status_code for a in answers] == [200] * 8
    # Once per cooldown, not once per call: every process reads the cooldown in Redis.
    assert fake_anthropic.seen_keys().count(proxied.key) == 1
    events = served_by()
    assert {(status, key) for status, key, _ in events} == {(200, second)}
    assert sum(retried for _, _, retried in events) == 1
    # `backend keys` shows who served and what set the other key aside.
    shown = {k["fingerprint"]: k for k in json.loads(run("keys", "anthropic", "--json"))}
    assert (shown[second]["calls"], shown[first]["calls"]) == (8, 0)
    assert shown[first]["health"]["state"] == "cooling"
    assert shown[first]["health"]["last_error"].startswith("429 at ")


@pytest.mark.django_db(transaction=True)
def test_a_process_that_cannot_reach_redis_still_skips_a_key_it_saw_rate_limited(
    proxied: Proxied, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    (only,) = keys_of(proxied.backend)
    key_update(key=only, weight=1000)
    _, second = two_keys(proxied, fake_anthropic)
    fake_anthropic.answer_key(proxied.key, 429, RATE_LIMITED, retry_after="30")
    # Cooldowns are read and written on a port where nothing listens: refused every time.
    refusing = redis.asyncio.BlockingConnectionPool.from_url(f"redis://127.0.0.1:{free_port()}")
    unreachable = redis.asyncio.Redis(connection_pool=refusing)  # as the proxy's: no retries
    monkeypatch.setattr("proxy.keys.async_redis_client", lambda: unreachable)
    answers = [call(proxied) for _ in range(8)]
    assert [a.status_code for a in answers] == [200] * 8
    assert fake_anthropic.seen_keys().count(proxied.key) == 1
    assert {(status, key) for status, key, _ in served_by()} == {(200, second)}


@pytest.mark.django_db(transaction=True)
def test_a_529_before_the_first_byte_fails_over_to_the_other_key(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    two_keys(proxied, fake_anthropic)
    fake_anthropic.answer_next(529, OVERLOADED)
    answer = call(proxied)
    assert answer.status_code == 200
    tried, served = fake_anthropic.seen_keys()
    assert tried != served
    fingerprints = {k.secret: k.fingerprint for k in keys_of(proxied.backend)}
    assert served_by() == [(200, fingerprints[served], True)]


@pytest.mark.django_db(transaction=True)
def test_when_every_key_cools_down_the_client_gets_the_upstreams_answer(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    two_keys(proxied, fake_anthropic)
    for key in keys_of(proxied.backend):
        fake_anthropic.answer_key(key.secret, 429, RATE_LIMITED, retry_after="30")
    answer = call(proxied)
    assert answer.status_code == 429
    assert answer.json() == RATE_LIMITED
    assert answer.headers["retry-after"] == "30"
    assert len(fake_anthropic.requests) == 2  # the first key, then the other once
    again = call(proxied)
    assert (again.status_code, again.json()) == (429, RATE_LIMITED)
    assert len(fake_anthropic.requests) == 3  # both cooling: one try, no retry
    assert [(s, retried) for s, _, retried in served_by()] == [(429, True), (429, False)]


@pytest.mark.django_db(transaction=True)
def test_a_stream_cut_after_its_first_byte_is_never_sent_again(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    two_keys(proxied, fake_anthropic)
    fake_anthropic.cut_stream_after = 2

    def read_it_all() -> int:
        with httpx.stream(
            "POST",
            f"{proxied.base_url}/v1/messages",
            headers={"x-api-key": proxied.token},
            json={**HELLO, "stream": True},
            timeout=10,
        ) as response:
            for _ in response.iter_bytes():
                pass
            return response.status_code

    with pytest.raises(httpx.HTTPError):
        read_it_all()
    assert len(fake_anthropic.requests) == 1
    audit_drained()
    event = AuditEvent.objects.get(action="proxy.request")
    assert event.outcome == "upstream_broke"
    assert "retried" not in event.detail


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("withdraw", [key_disable, key_remove], ids=["disabled", "removed"])
def test_a_disabled_or_removed_key_serves_no_next_call_in_another_process(
    proxied: Proxied,
    fake_anthropic: FakeAnthropic,
    second_process: str,
    withdraw: Callable[..., object],
) -> None:
    # The first key weighs 1000 to the other's 1: before, it serves (nearly) every call.
    (first,) = keys_of(proxied.backend)
    key_update(key=first, weight=1000)
    two_keys(proxied, fake_anthropic)
    there = second_process + "/v1/proxy/anthropic"
    assert [call(proxied, there).status_code for _ in range(3)] == [200] * 3
    assert proxied.key in fake_anthropic.seen_keys()
    withdraw(key=BackendKey.objects.get(pk=first.pk))
    fake_anthropic.requests.clear()
    assert [call(proxied, there).status_code for _ in range(5)] == [200] * 5
    assert proxied.key not in fake_anthropic.seen_keys()
    assert len(fake_anthropic.seen_keys()) == 5


@pytest.mark.django_db(transaction=True)
def test_a_one_key_backend_gets_the_upstreams_429_with_no_retry(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.answer_key(proxied.key, 429, RATE_LIMITED, retry_after="30")
    assert call(proxied).status_code == 429
    assert call(proxied).status_code == 429
    assert fake_anthropic.seen_keys() == [proxied.key, proxied.key]  # no cooldown to skip it
    assert [(s, retried) for s, _, retried in served_by()] == [(429, False), (429, False)]


# The CLI and the REST API, thin callers of the same services.


def run(*args: str, stdin: str = "") -> str:
    out = io.StringIO()
    with mock.patch("sys.stdin", io.StringIO(stdin)):
        call_command("backend", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_the_cli_adds_lists_disables_enables_and_removes_keys(
    fake_anthropic: FakeAnthropic,
) -> None:
    first, second = api_key(tail="Cli1"), api_key(tail="Cli2")
    third, fifth = api_key(tail="Cli3"), api_key(tail="Cli5")
    fake_anthropic.valid_keys |= {second, third, fifth}
    backend_add(name="anthropic", secret=first, base_url=fake_anthropic.url)
    added = run("key-add", "anthropic", "--api-key", "-", "--weight", "3", stdin=second + "\n")
    assert added.startswith("added key sk-ant-api03-…Cli2 to anthropic (weight 3)")
    listed = run("keys", "anthropic")
    assert listed.splitlines()[0].split() == [
        "FINGERPRINT", "STATE", "WEIGHT", "ENABLED", "HEALTH", "CALLS", "(24H)", "LAST", "ERROR",
        "LAST", "CHECK",
    ]  # fmt: skip
    assert [line.split()[:5] for line in listed.splitlines()[1:]] == [
        ["sk-ant-api03-…Cli1", "unknown", "1", "yes", "ok"],
        ["sk-ant-api03-…Cli2", "valid", "3", "yes", "ok"],
    ]
    as_json = json.loads(run("keys", "anthropic", "--json"))
    assert [(k["fingerprint"], k["weight"], k["health"]["state"]) for k in as_json] == [
        ("sk-ant-api03-…Cli1", 1, "ok"),
        ("sk-ant-api03-…Cli2", 3, "ok"),
    ]
    for output in (added, listed, json.dumps(as_json)):
        assert first not in output
        assert second not in output
    assert run("key-disable", "anthropic", "sk-ant-api03-…Cli1").startswith("disabled key")
    with pytest.raises(CommandError, match="last enabled key"):
        run("key-rm", "anthropic", "sk-ant-api03-…Cli2")
    assert run("key-enable", "anthropic", "sk-ant-api03-…Cli1").startswith("enabled key")
    assert run("key-rm", "anthropic", "sk-ant-api03-…Cli2").startswith("removed key")
    with pytest.raises(CommandError, match="has no key"):
        run("key-rm", "anthropic", "sk-ant-api03-…Cli2")
    run("key-add", "anthropic", "--api-key", third)
    with pytest.raises(CommandError, match="name the one to replace"):
        run("rotate", "anthropic", "--api-key", api_key(tail="Cli4"))
    rotated = run(
        "rotate", "anthropic", "--api-key", fifth, "--fingerprint",
        "sk-ant-api03-…Cli3",
    )  # fmt: skip
    assert rotated.splitlines() == [
        "rotated anthropic: sk-ant-api03-…Cli3 -> sk-ant-api03-…Cli5",
        f"anthropic: valid: {fake_anthropic.url.removeprefix('http://')} accepted the key",
    ]


@pytest.mark.django_db
def test_the_rest_api_manages_keys_with_the_backends_permissions(
    admin_api: Client, fake_anthropic: FakeAnthropic
) -> None:
    backend_add(name="anthropic", secret=api_key(tail="Api1"), base_url=fake_anthropic.url)
    url = "/v1/admin/backends/anthropic/keys"
    secret = api_key(tail="Api2")
    fake_anthropic.valid_keys.add(secret)
    created = admin_api.post(url, {"secret": secret, "weight": 2}, content_type="application/json")
    assert created.status_code == 201, created.content
    assert (created.json()["fingerprint"], created.json()["weight"]) == ("sk-ant-api03-…Api2", 2)
    listed = admin_api.get(url)
    assert [k["fingerprint"] for k in listed.json()] == ["sk-ant-api03-…Api1", "sk-ant-api03-…Api2"]
    one = f"{url}/{quote('sk-ant-api03-…Api1')}"
    patched = admin_api.patch(one, {"enabled": False}, content_type="application/json")
    assert (patched.status_code, patched.json()["enabled"]) == (200, False)
    refused = admin_api.delete(f"{url}/{quote('sk-ant-api03-…Api2')}")
    assert refused.status_code == 409
    assert list(refused.json()["error"]["fields"]) == ["fingerprint"]
    assert admin_api.delete(one).status_code == 204
    assert admin_api.get(f"{url}/nope").status_code == 405
    assert admin_api.patch(f"{url}/nope", {}, content_type="application/json").status_code == 404
    for response in (created, listed, patched):
        assert secret.encode() not in response.content
    duplicate = admin_api.post(url, {"secret": secret}, content_type="application/json")
    assert duplicate.status_code == 409

    viewer = get_user_model().objects.create_user("vic", password="pw-vic-123", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_backend"))
    token = admintoken_create(name="vic", username="vic").plaintext
    vic = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert vic.get(url).status_code == 200
    forbidden = vic.post(url, {"secret": api_key()}, content_type="application/json")
    assert forbidden.status_code == 403
    assert "broker.change_backend" in forbidden.json()["error"]["message"]


@pytest.mark.django_db
def test_the_key_endpoints_are_in_the_openapi_schema() -> None:
    schema = Client().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    keys = schema["paths"]["/v1/admin/backends/{name}/keys"]
    one = schema["paths"]["/v1/admin/backends/{name}/keys/{fingerprint}"]
    assert {"get", "post"} <= set(keys)
    assert {"patch", "delete"} <= set(one)
    added = keys["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert added.endswith("/KeyCreateInputRequest")


@pytest.mark.django_db
def test_the_admin_validates_one_key(fake_anthropic: FakeAnthropic) -> None:
    alice = get_user_model().objects.create_superuser("alice", password="alice-pw-123")
    admin = Client()
    admin.force_login(alice)
    good, bad = api_key(tail="Vgd1"), api_key(tail="Vbd2")
    fake_anthropic.valid_keys.add(good)
    backend = backend_add(name="anthropic", secret=good, base_url=fake_anthropic.url)
    key_add(backend=backend, secret=bad)
    _, checked = keys_of(backend)
    page = f"/admin/broker/backend/{backend.pk}/change/"
    shown = admin.post(f"{page}keys/{checked.pk}/validate/", follow=True).content.decode()
    assert "Key sk-ant-api03-…Vbd2: invalid (upstream answered 401" in shown
    assert [k.validation_state for k in keys_of(backend)] == ["unknown", "invalid"]
    assert [seen.headers["x-api-key"] for seen in fake_anthropic.requests] == [bad]


@pytest.mark.django_db
def test_the_admin_lists_adds_disables_and_removes_keys_through_the_services() -> None:
    alice = get_user_model().objects.create_superuser("alice", password="alice-pw-123")
    admin = Client()
    admin.force_login(alice)
    first, second = api_key(tail="Adm1"), api_key(tail="Adm2")
    backend = backend_add(name="anthropic", secret=first)
    page = f"/admin/broker/backend/{backend.pk}/change/"
    form = {
        "base_url": backend.base_url, "token_ttl_min": 60, "token_ttl_default": 600,
        "token_ttl_max": 3600, "enabled": "on", "add_key": second, "add_key_weight": 4,
    }  # fmt: skip
    saved = admin.post(page, form)
    assert saved.status_code == 302, saved.content.decode()[:2000]
    assert [(k.fingerprint, k.weight) for k in keys_of(backend)] == [
        ("sk-ant-api03-…Adm1", 1),
        ("sk-ant-api03-…Adm2", 4),
    ]
    shown = admin.get(page).content.decode()
    assert "sk-ant-api03-…Adm2" in shown
    assert first not in shown
    assert second not in shown
    again = admin.post(page, form)  # the same key twice: the service's refusal, on its field
    assert again.status_code == 200
    assert "already has a key sk-ant-api03-…Adm2" in again.content.decode()
    one, two = keys_of(backend)
    assert admin.post(f"{page}keys/{one.pk}/disable/").status_code == 302
    assert [k.enabled for k in keys_of(backend)] == [False, True]
    refused = admin.post(f"{page}keys/{two.pk}/remove/", follow=True)
    assert "last enabled key" in refused.content.decode()
    assert admin.post(f"{page}keys/{one.pk}/remove/").status_code == 302
    assert [k.fingerprint for k in keys_of(backend)] == ["sk-ant-api03-…Adm2"]
    assert AuditEvent.objects.filter(action="backend.key_removed", actor="alice").count() == 1


@pytest.mark.django_db
def test_ready_shows_each_key_of_a_pool(client: Client) -> None:
    from broker.runtime.health import worker_heartbeat_record

    backend = backend_add(name="anthropic", secret=api_key(tail="Rdy1"))
    worker_heartbeat_record()
    assert "keys" not in client.get("/ready").json()["backends"]["anthropic"]  # one: as before
    key_add(backend=backend, secret=api_key(tail="Rdy2"))
    BackendKey.objects.filter(fingerprint="sk-ant-api03-…Rdy1").update(validation_state="invalid")
    assert client.get("/ready").json()["backends"]["anthropic"]["keys"] == {
        "sk-ant-api03-…Rdy1": {"state": "invalid", "enabled": True, "health": "ok"},
        "sk-ant-api03-…Rdy2": {"state": "unknown", "enabled": True, "health": "ok"},
    }


@pytest.mark.django_db(transaction=True)
def test_a_retried_call_counts_once_against_the_grants_rate(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    two_keys(proxied, fake_anthropic)
    grant = Grant.objects.select_related("agent", "backend").get(agent__name="bob")
    grant_update(grant=grant, policy={"rpm": 2})
    fake_anthropic.answer_next(529, OVERLOADED)
    assert call(proxied).status_code == 200  # two upstream attempts, one call
    assert call(proxied).status_code == 200
    refused = call(proxied)
    assert refused.status_code == 429
    assert "policy rpm" in refused.json()["error"]["message"]
    assert len(fake_anthropic.requests) == 3


@pytest.mark.django_db(transaction=True)
def test_a_key_the_upstream_refuses_is_set_aside_and_validated(
    proxied: Proxied, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued: list[tuple[int, int]] = []

    async def queue(backend_id: int, key_id: int) -> None:
        queued.append((backend_id, key_id))

    # The live server runs in this process: its proxy queues through this module.
    monkeypatch.setattr("proxy.keys._queue_validation_async", queue)
    (only,) = keys_of(proxied.backend)
    key_update(key=only, weight=1000)
    _, second = two_keys(proxied, fake_anthropic)
    fake_anthropic.valid_keys.discard(proxied.key)  # the fake now answers 401 for it
    assert [call(proxied).status_code for _ in range(3)] == [200] * 3
    assert fake_anthropic.seen_keys().count(proxied.key) == 1
    assert queued == [(proxied.backend.pk, only.pk)]
    assert {key for _, key, _ in served_by()} == {second}


@pytest.mark.django_db
def test_the_rest_rotate_names_the_key_it_replaces(admin_api: Client) -> None:
    backend = backend_add(name="anthropic", secret=api_key(tail="Rot1"))
    key_add(backend=backend, secret=api_key(tail="Rot2"))
    url = "/v1/admin/backends/anthropic/rotate"
    unnamed = admin_api.post(url, {"secret": api_key()}, content_type="application/json")
    assert unnamed.status_code == 400
    assert list(unnamed.json()["error"]["fields"]) == ["fingerprint"]
    named = admin_api.post(
        url,
        {"secret": api_key(tail="Rot3"), "fingerprint": "sk-ant-api03-…Rot2"},
        content_type="application/json",
    )
    assert named.status_code == 200, named.content
    assert [k.fingerprint for k in keys_of(backend)] == ["sk-ant-api03-…Rot1", "sk-ant-api03-…Rot3"]


BAD_KEY_BODIES = [
    ({"secret": 5}, "secret"),
    ({"secret": "not-a-key-at-all"}, "secret"),
    ({"secret": "sk-ant-api03-shortB@d"}, "secret"),
    ({"secret": api_key(tail="Bad1"), "weight": 0}, "weight"),
    ({"secret": api_key(tail="Bad2"), "weight": 1001}, "weight"),
    ({"secret": api_key(tail="Bad3"), "weight": "heavy"}, "weight"),
    ({"secret": api_key(tail="Bad4"), "extra": 1}, None),
    ({"weight": 2}, "secret"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("body", "field"), BAD_KEY_BODIES)
def test_a_bad_key_body_is_a_400_that_adds_nothing_and_echoes_no_secret(
    admin_api: Client, body: dict[str, Any], field: str | None
) -> None:
    backend_add(name="anthropic", secret=api_key(tail="Good"))
    before = list(BackendKey.objects.values_list("fingerprint", "weight", "enabled"))
    events = AuditEvent.objects.count()
    refused = admin_api.post(
        "/v1/admin/backends/anthropic/keys", body, content_type="application/json"
    )
    assert refused.status_code == 400, refused.content
    if field is not None:
        assert field in refused.json()["error"]["fields"]
    secret = body.get("secret")
    if isinstance(secret, str):
        assert secret.encode() not in refused.content
    assert list(BackendKey.objects.values_list("fingerprint", "weight", "enabled")) == before
    assert AuditEvent.objects.count() == events


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body", [{"weight": 0}, {"weight": True}, {"enabled": "no"}, {"enabled": None}, {"colour": 1}]
)
def test_a_bad_key_change_is_a_400_that_changes_nothing(
    admin_api: Client, body: dict[str, Any]
) -> None:
    backend_add(name="anthropic", secret=api_key(tail="Good"))
    key_add(backend=Backend.objects.get(), secret=api_key(tail="Two2"))
    before = list(BackendKey.objects.values_list("fingerprint", "weight", "enabled"))
    url = f"/v1/admin/backends/anthropic/keys/{quote('sk-ant-api03-…Two2')}"
    refused = admin_api.patch(url, body, content_type="application/json")
    assert refused.status_code == 400, refused.content
    assert list(BackendKey.objects.values_list("fingerprint", "weight", "enabled")) == before


@pytest.mark.django_db
def test_malformed_json_to_the_key_endpoints_is_a_400(admin_api: Client) -> None:
    backend_add(name="anthropic", secret=api_key(tail="Good"))
    url = "/v1/admin/backends/anthropic/keys"
    for method in (admin_api.post, admin_api.patch):
        target = url if method == admin_api.post else f"{url}/{quote('sk-ant-api03-…Good')}"
        refused = method(target, '{"secret": ', content_type="application/json")
        assert refused.status_code == 400
    assert BackendKey.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_backend_whose_every_key_is_invalid_says_so_instead_of_the_upstreams_401(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    """Issue 20, item 1: the agent saw the upstream's "invalid x-api-key" as if its own
    token were bad."""
    fake_anthropic.valid_keys.discard(proxied.key)
    assert backend_validate(backend=proxied.backend).state == ValidationState.INVALID
    refused = call(proxied)
    fake_anthropic.valid_keys.add(proxied.key)  # fixed upstream; validated again, it serves
    assert backend_validate(backend=proxied.backend).state == ValidationState.VALID
    served = call(proxied)

    assert (refused.status_code, refused.headers["x-should-retry"]) == (503, "false")
    assert refused.json()["error"]["message"] == (
        "backend anthropic's key was found invalid by its last validation; an admin must "
        "replace it (`manage.py backend rotate anthropic`, or the admin's Backends page)"
    )
    assert served.status_code == 200
    assert [r.path for r in fake_anthropic.requests] == ["/v1/models", "/v1/models", "/v1/messages"]
