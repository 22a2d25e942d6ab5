"""Adding an alert channel as a person does it (issue 17): a real Chromium on the admin's add
page against the live server; the signing secret is on the page after saving, and nowhere
once she moves on; then a test alert reaches the receiver."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import NotificationChannel, NotificationDelivery
from audit.notify import delivery_attempt
from tests.browser import ARTIFACTS, log_in
from tests.webhook_receiver import Receiver, signature_valid

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_alice_adds_a_webhook_copies_its_secret_and_sends_a_test(
    page: Any, live_url: str, receiver: Receiver
) -> None:
    log_in(page, live_url, next_path="/admin/audit/notificationchannel/add/")
    page.wait_for_selector("#id_url")
    assert page.get_attribute("#id_url", "type") == "password"  # a Slack URL is a secret
    page.select_option("#id_kind", "webhook")
    page.fill("#id_url", f"{receiver.url}/alerts/hook")
    page.check("input[name=events][value='agent.waiting']")
    page.check("input[name=events][value='budget.100']")
    page.click("input[name=_save]")
    shown = page.wait_for_selector("#kb-signing-secret").inner_text()
    channel = NotificationChannel.objects.get()
    assert shown == channel.signing_secret
    assert channel.events == ["agent.waiting", "budget.100"]
    page.screenshot(path=str(ARTIFACTS / "admin-alert-channel-added.png"), full_page=True)

    page.click("text=Back to the channels")
    page.wait_for_selector("#result_list")
    assert shown not in page.content()
    assert "alerts/hook" not in page.content()
    page.check(f"input[name=_selected_action][value='{channel.pk}']")
    page.select_option("select[name=action]", "send_test")
    page.click("button[name=index]")
    page.wait_for_selector(".messagelist .success")
    (delivery,) = NotificationDelivery.objects.all()
    delivery_attempt(delivery_id=str(delivery.pk))
    (seen,) = receiver.seen
    assert signature_valid(shown, seen.headers["x-keybroker-signature"], seen.body)


def test_alice_is_told_what_is_wrong_and_nothing_is_added(page: Any, live_url: str) -> None:
    log_in(page, live_url, next_path="/admin/audit/notificationchannel/add/")
    page.wait_for_selector("#id_url")
    page.select_option("#id_kind", "email")
    page.fill("#id_url", "ops@example.com, not an address")
    page.check("input[name=events][value='spike']")
    page.click("input[name=_save]")
    page.wait_for_selector(".errorlist")
    assert "'not an address' is not an email address" in page.inner_text(".field-url")
    assert page.input_value("#id_url") == ""  # never echoed back
    assert not NotificationChannel.objects.exists()
