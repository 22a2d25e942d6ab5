"""Alert channels from the admin and from `manage.py notify` (issue 17), and one story through
every surface scanned for a channel's secrets: the signing secret and a Slack URL appear in
the one answer that creates them and nowhere else (responses, pages, commands, the delivery
log, the audit trail, the logs, the raw table)."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent, DeliveryState, NotificationChannel, NotificationDelivery
from audit.notify import delivery_attempt
from tests.agents import enroll, send
from tests.webhook_receiver import Receiver, signature_valid

ADD = "/admin/audit/notificationchannel/add/"
CHANGELIST = "/admin/audit/notificationchannel/"
SLACK_PATH = "/services/T0AAA/B0BBB/xoxSlackSecretPath42"


@pytest.fixture
def admin_pages(alice: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(alice)
    return client


def command(*args: str, stdin: str = "") -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    import sys

    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        call_command("notify", *args, stdout=out, stderr=err)
    finally:
        sys.stdin = old
    return out.getvalue(), err.getvalue()


# --- the admin -------------------------------------------------------------------------------
@pytest.mark.django_db
def test_the_admin_adds_a_webhook_and_shows_its_secret_on_that_page_only(
    admin_pages: Client,
) -> None:
    page = admin_pages.post(
        ADD, {"kind": "webhook", "url": "https://hooks.example.com/in/Ab12", "events": ["spike"]}
    )
    assert page.status_code == 200
    channel = NotificationChannel.objects.get()
    assert channel.signing_secret in page.content.decode()
    assert channel.events == ["spike"]
    assert channel.created_by == "alice"
    for url in (CHANGELIST, f"{CHANGELIST}{channel.pk}/change/"):
        shown = admin_pages.get(url)
        assert shown.status_code == 200
        assert channel.signing_secret not in shown.content.decode()
        assert "in/Ab12" not in shown.content.decode()
        assert "https://hooks.example.com/…Ab12" in shown.content.decode()


@pytest.mark.django_db
def test_the_admin_names_bad_input_on_its_field_and_creates_nothing(admin_pages: Client) -> None:
    page = admin_pages.post(ADD, {"kind": "webhook", "url": "ftp://nope", "events": ["spike"]})
    assert page.status_code == 200
    assert "give an http:// or https:// URL" in page.content.decode()
    page = admin_pages.post(ADD, {"kind": "email", "url": "a@example.com"})
    assert "This field is required" in page.content.decode()
    assert not NotificationChannel.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_send_test_from_the_admin_reaches_the_receiver_and_the_log_shows_the_try(
    admin_pages: Client, receiver: Receiver
) -> None:
    admin_pages.post(ADD, {"kind": "webhook", "url": f"{receiver.url}/t", "events": ["spike"]})
    channel = NotificationChannel.objects.get()
    response = admin_pages.post(
        CHANGELIST, {"action": "send_test", "_selected_action": [channel.pk]}, follow=True
    )
    assert "Test alert queued to 1 channel(s)" in response.content.decode()
    (delivery,) = NotificationDelivery.objects.all()
    delivery_attempt(delivery_id=str(delivery.pk))
    (seen,) = receiver.seen
    assert json.loads(seen.body)["event"] == "test"
    assert signature_valid(channel.signing_secret, seen.headers["x-keybroker-signature"], seen.body)
    log = admin_pages.get(
        f"/admin/audit/notificationdelivery/{delivery.pk}/change/"
    ).content.decode()
    assert "delivered" in log
    assert ">200<" in log.replace(" ", "").replace("\n", "")
    # Removing goes through the service, audited; the delivery log goes with the channel.
    admin_pages.post(CHANGELIST, {"action": "remove_selected", "_selected_action": [channel.pk]})
    assert not NotificationChannel.objects.exists()
    assert not NotificationDelivery.objects.exists()
    assert AuditEvent.objects.filter(action="alerts.channel_removed", actor="alice").exists()


# --- manage.py notify ------------------------------------------------------------------------
@pytest.mark.django_db
def test_notify_add_ls_test_rm() -> None:
    out, err = command(
        "add", "https://hooks.example.com/x/Qw9Z", "--events", "agent.waiting,budget.100"
    )
    channel = NotificationChannel.objects.get()
    assert out.strip() == channel.signing_secret
    assert f"alert channel {channel.pk}: webhook to https://hooks.example.com/…Qw9Z" in err
    listed, _ = command("ls")
    assert "agent.waiting,budget.100" in listed
    assert channel.signing_secret not in listed
    assert "x/Qw9Z" not in listed
    tested, _ = command("test", str(channel.pk))
    (delivery,) = NotificationDelivery.objects.all()
    assert tested.strip() == f"test alert queued: delivery {delivery.pk}"
    assert delivery.state == DeliveryState.PENDING
    assert command("disable", str(channel.pk))[0].strip() == f"alert channel {channel.pk} disabled"
    assert "disabled" in command("ls")[0]
    command("enable", str(channel.pk))
    assert NotificationChannel.objects.get().enabled is True
    command("rm", str(channel.pk))
    assert not NotificationChannel.objects.exists()
    assert command("ls")[0].strip() == "no alert channels"


@pytest.mark.django_db
def test_notify_refuses_bad_input_naming_it() -> None:
    with pytest.raises(CommandError, match=r"events: unknown 'agent\.gone'"):
        command("add", "https://example.com/h", "--events", "agent.gone")
    with pytest.raises(CommandError, match=r"url: give an http:// or https:// URL"):
        command("add", "example.com/h", "--events", "spike")
    with pytest.raises(CommandError, match="no alert channel '42'"):
        command("rm", "42")
    assert not NotificationChannel.objects.exists()


# --- secrets ---------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_no_surface_shows_a_channels_secrets(
    admin_api: Client,
    admin_pages: Client,
    receiver: Receiver,
    anthropic: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.failures = 1  # one failed try too: its error is logged
    webhook = send(
        admin_api, "post", "/v1/admin/notifications/",
        {"url": f"{receiver.url}/hook", "events": ["agent.waiting"]},
    ).json()  # fmt: skip
    slack_url = f"{receiver.url}{SLACK_PATH}"
    slack = send(
        admin_api, "post", "/v1/admin/notifications/",
        {"kind": "slack", "url": slack_url, "events": ["agent.waiting"]},
    ).json()  # fmt: skip
    out, _ = command("add", "-", "--kind", "slack", "--events", "spike", stdin=slack_url + "\n")
    signing = webhook["signing_secret"]
    enroll("bob")
    for _ in range(2):
        NotificationDelivery.objects.update(next_try_at=timezone.now())  # backoff passed
        for delivery in NotificationDelivery.objects.exclude(state=DeliveryState.DELIVERED):
            delivery_attempt(delivery_id=str(delivery.pk))
    # A bad request that carries the secret URL: refused without echoing it.
    refused = send(
        admin_api, "post", "/v1/admin/notifications/",
        {"kind": "slack", "url": slack_url, "events": ["nope"]},
    )  # fmt: skip
    assert refused.status_code == 400

    seen = [
        out.encode(),
        refused.content,
        admin_api.get("/v1/admin/notifications/").content,
        *(admin_api.get(f"/v1/admin/notifications/{c['id']}").content for c in (webhook, slack)),
        *(admin_api.get(f"/v1/admin/notifications/{c['id']}/deliveries").content
          for c in (webhook, slack)),
        admin_pages.get(CHANGELIST).content,
        *(admin_pages.get(f"{CHANGELIST}{pk}/change/").content
          for pk in NotificationChannel.objects.values_list("pk", flat=True)),
        admin_pages.get("/admin/audit/notificationdelivery/").content,
        *(admin_pages.get(f"/admin/audit/notificationdelivery/{pk}/change/").content
          for pk in NotificationDelivery.objects.values_list("pk", flat=True)),
        admin_pages.get("/admin/audit/auditevent/").content,
        command("ls")[0].encode(),
    ]  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM audit_notificationchannel")
        raw = repr(cursor.fetchall()).encode()
        cursor.execute("SELECT * FROM audit_notificationdelivery")
        raw += repr(cursor.fetchall()).encode()
        cursor.execute("SELECT * FROM audit_deliveryattempt")
        raw += repr(cursor.fetchall()).encode()
    audit_rows = json.dumps(list(AuditEvent.objects.values()), default=str).encode()
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()

    # The story happened: both channels got the alert, one after a failed try.
    assert len(receiver.seen) == 3
    assert NotificationDelivery.objects.filter(state=DeliveryState.DELIVERED).count() == 2
    assert any(b"the receiver answered 500" in blob for blob in seen)
    assert slack["target"].endswith("/…th42")
    for secret in (signing.encode(), SLACK_PATH.encode(), b"xoxSlackSecretPath"):
        for blob in [*seen, raw, audit_rows, logs]:
            assert secret not in blob
    assert re.search(rb"ckw_\xe2\x80\xa6", seen[2])  # the hint is shown, not the secret
