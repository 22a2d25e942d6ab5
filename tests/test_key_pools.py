"""A backend's pool of keys (issue 15): the domain's rules, the migration that made every
backend's key a pool of one, and the proxy's choice and failover against the fake upstream."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from audit.models import AuditEvent
from broker.infra.errors import Conflict, NotFound, ServiceError
from broker.models import Backend, BackendKey, ValidationState
from broker.selectors.backend_keys import key_get, keys_enabled, keys_of
from broker.services.backend_keys import key_add, key_disable, key_enable, key_remove, key_update
from broker.services.backends import backend_add, backend_rotate, backend_validate
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key, oauth_token


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
