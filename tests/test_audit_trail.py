"""The trail itself: append-only rows, the sync door, publishing after commit, retention."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from audit import services as audit_services
from audit.chain import chain_write
from audit.models import AppendOnly, AuditEvent
from audit.services import audit_prune, audit_record
from audit.tasks import audit_prune_task
from broker.models import Backend
from broker.services.agents import agent_enroll
from broker.services.tokens import token_issue, token_revoke

pytestmark = pytest.mark.django_db


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """What audit_record handed to the live feed, instead of sending it to Redis."""
    sent: list[list[Any]] = []
    monkeypatch.setattr(audit_services, "audit_publish", lambda events: sent.append(events))
    return sent


def test_an_event_cannot_be_changed_or_deleted() -> None:
    event = audit_record(action="backend.added", backend="anthropic")
    event.message = "rewritten"
    with pytest.raises(AppendOnly):
        event.save()
    with pytest.raises(AppendOnly):
        event.delete()
    with pytest.raises(AppendOnly):
        AuditEvent.objects.filter(pk=event.pk).update(message="rewritten")
    with pytest.raises(AppendOnly):
        AuditEvent.objects.all().delete()
    assert AuditEvent.objects.get().message == ""


def test_token_fields_become_columns_and_the_rest_stays_in_detail(
    alice: AbstractBaseUser, anthropic: Backend
) -> None:
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    issued = token_issue(agent=bob, backend_name="anthropic", ttl="30m", address="10.0.0.7")
    token_revoke(token=issued.token, by=alice, reason="leaked in a log")

    minted = AuditEvent.objects.get(action="token.issued")
    assert (minted.token_id, minted.token_prefix) == (
        str(issued.token.pk),
        issued.token.display_prefix,
    )
    assert minted.detail == {"ttl": 1800}
    assert (minted.actor_type, minted.actor, minted.agent) == ("agent", "bob", "bob")
    assert minted.client_address == "10.0.0.7"
    revoked = AuditEvent.objects.get(action="token.revoked")
    assert (revoked.actor_type, revoked.actor, revoked.message) == (
        "admin",
        "alice",
        "leaked in a log",
    )
    assert revoked.token_id == str(issued.token.pk)
    assert revoked.detail == {}


def test_a_failed_login_keeps_its_credential_kind_in_detail_not_in_the_http_method() -> None:
    event = audit_record(action="auth.failed", address="10.0.0.9", method="vend_token")
    assert (event.method, event.detail) == ("", {"method": "vend_token"})


def test_a_detail_value_json_cannot_hold_is_stored_as_text() -> None:
    moment = timezone.now()
    event = audit_record(action="backend.updated", backend="anthropic", checked_at=moment)
    event.refresh_from_db()
    assert event.detail == {"checked_at": str(moment)}


def test_a_secret_in_a_message_is_redacted_and_long_values_are_cut() -> None:
    key = "sk-ant-api03-" + "x" * 40
    event = audit_record(
        action="backend.invalid", backend="b" * 100, message=f"bad key {key} " * 40
    )
    event.refresh_from_db()
    assert key not in event.message
    assert "[redacted]" in event.message
    assert (len(event.message), len(event.backend)) == (500, 63)


@pytest.mark.django_db(transaction=True)
def test_the_feed_hears_of_an_event_only_after_its_transaction_commits(
    published: list[list[Any]],
) -> None:
    with transaction.atomic():
        event = audit_record(action="backend.added", backend="anthropic")
        assert published == []
    assert [[e.pk for e in batch] for batch in published] == [[event.pk]]


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_action_leaves_no_event_and_publishes_nothing(
    published: list[list[Any]],
) -> None:
    def failing_action() -> None:
        with transaction.atomic():
            audit_record(action="backend.added", backend="anthropic")
            raise RuntimeError("the action failed")

    with pytest.raises(RuntimeError):
        failing_action()
    assert not AuditEvent.objects.exists()
    assert published == []


@pytest.mark.django_db(transaction=True)
def test_a_channel_layer_that_is_down_never_breaks_the_write(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class DownLayer:
        async def group_send(self, group: str, message: Any) -> None:
            raise ConnectionError("redis is down")

    monkeypatch.setattr("audit.publish.get_channel_layer", DownLayer)
    event = audit_record(action="backend.added", backend="anthropic")
    assert AuditEvent.objects.get().pk == event.pk
    assert "not published (ConnectionError)" in caplog.text


def test_retention_deletes_only_events_older_than_the_window(settings: Any) -> None:
    settings.AUDIT_RETENTION_DAYS = 30
    now = timezone.now()
    chain_write(
        [
            {"action": "old", "actor_type": "system", "created_at": now - timedelta(days=31)},
            {"action": "old", "actor_type": "system", "created_at": now - timedelta(days=45)},
            {"action": "kept", "actor_type": "system", "created_at": now - timedelta(days=29)},
            {"action": "kept", "actor_type": "system", "created_at": now},
        ]
    )
    audit_prune_task()
    assert sorted(AuditEvent.objects.values_list("action", flat=True)) == ["kept", "kept"]
    assert audit_prune(now=now + timedelta(days=2)) == 1  # the 29-day-old one, now 31


def test_retention_works_through_a_table_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_services, "PRUNE_CHUNK", 7)
    old = timezone.now() - timedelta(days=400)
    chain_write([{"action": "old", "actor_type": "system", "created_at": old}] * 30)
    audit_record(action="kept")
    assert audit_prune(days=90) == 30
    assert list(AuditEvent.objects.values_list("action", flat=True)) == ["kept"]


def test_beat_runs_retention_and_each_run_expires_before_the_next(settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["audit-retention"]
    assert entry["task"] == audit_prune_task.name
    assert entry["options"]["expires"] < entry["schedule"]
