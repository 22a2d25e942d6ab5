"""The live activity page as alice uses it: a real Chromium against a real server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model

from audit.models import ActorType, AuditEvent
from audit.publish import ACTIVITY_GROUP, MISSED_TYPE
from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import audit_drained, proxied_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 8,
           "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip


def test_alice_watches_calls_arrive_pauses_filters_and_sees_her_approval(
    page: Any,
    browser: Any,
    live_url: str,
    fake_anthropic: FakeAnthropic,
    settings: Any,
) -> None:
    settings.PUBLIC_URL = live_url
    alice = get_user_model().objects.get(username="alice")
    proxied = proxied_for(live_url=live_url, fake=fake_anthropic, alice=alice)
    http = httpx.Client(base_url=proxied.base_url, timeout=10)

    log_in(page, live_url)
    page.click("#kb-activity-link")
    page.wait_for_selector("#kb-connection.kb-live")
    feed = page.locator("#kb-feed tbody")
    # Never empty: the events of setting bob up are there on load.
    assert feed.locator("tr.kb-event[data-action='token.issued']").count() == 1

    assert http.post("/v1/messages", json=MESSAGE, headers={"x-api-key": proxied.token}).is_success
    call = feed.locator("tr.kb-ok[data-action='proxy.request']")
    call.wait_for()
    assert feed.locator("tr.kb-event").first.get_attribute("data-action") == "proxy.request"
    assert call.locator(".kb-model").inner_text() == "claude-haiku-4-5"
    assert call.locator(".kb-tokens").inner_text() == "12 / 6"
    assert call.locator(".kb-status").inner_text() == "200"
    assert "ms" in call.locator(".kb-latency").inner_text()
    page.screenshot(path=str(ARTIFACTS / "activity-live.png"), full_page=True)

    # Paused, a refused call is held back and counted; on resume it shows, coloured.
    page.click("#kb-pause")
    wrong = http.get("/v1/models", headers={"x-api-key": proxied.token[:-3] + "xyz"})
    assert wrong.status_code == 401
    page.wait_for_selector("#kb-connection:has-text('paused (1 new)')")
    assert feed.locator("tr.kb-denied").count() == 0
    page.click("#kb-pause")
    denied = feed.locator("tr.kb-denied")
    denied.wait_for()
    assert denied.locator(".kb-status").inner_text() == "401"
    assert "invalid token" in denied.locator(".kb-what").inner_text()

    # A filter no event matches empties the table; clearing it brings them back.
    page.fill("#kb-filter-agent", "nobody")
    page.click("#kb-apply")
    page.wait_for_selector("#kb-empty:not([hidden])")
    assert feed.locator("tr.kb-event").count() == 0
    page.fill("#kb-filter-agent", "")
    page.click("#kb-apply")
    call.wait_for()

    # Alice approves dave in another tab; the approval shows up here as it happens.
    enrolled = httpx.post(f"{live_url}/v1/enroll", json={"name": "dave", "scopes": ["anthropic"]})
    assert enrolled.status_code == 201
    admin = browser.new_page()
    log_in(admin, live_url)
    admin.wait_for_selector("#kb-waiting")
    admin.goto(f"{live_url}/admin/broker/agent/?waiting=yes")
    admin.locator("#result_list tr", has_text="dave").locator("button.kb-approve").click()
    assert "Agent dave approved" in admin.wait_for_selector(".messagelist .success").inner_text()
    admin.screenshot(path=str(ARTIFACTS / "activity-admin-approval.png"), full_page=True)
    approved = feed.locator("tr.kb-event[data-action='agent.approved']", has_text="dave")
    approved.wait_for()
    assert approved.locator(".kb-agent").inner_text() == "dave (by alice)"
    page.screenshot(path=str(ARTIFACTS / "activity-after-approval.png"), full_page=True)
    assert proxied.token not in page.content()

    # The whole trail in the admin, narrowed to dave with the agent box.
    admin.goto(f"{live_url}/admin/audit/auditevent/")
    agent_box = admin.locator("details[data-filter-title='agent'] input[type=search]")
    agent_box.fill("dave")
    agent_box.press("Enter")
    admin.wait_for_url("**agent=dave**")
    agents = admin.locator("#result_list tbody td.field-agent_cut").all_inner_texts()
    assert agents == ["dave"] * 3  # enrolled, granted, approved
    admin.screenshot(path=str(ARTIFACTS / "admin-audit-events.png"), full_page=True)
    admin.close()
    audit_drained()


def test_a_missed_notice_makes_the_page_reload_what_was_not_sent_live(
    page: Any, live_url: str, settings: Any
) -> None:
    settings.PUBLIC_URL = live_url
    sockets: list[Any] = []
    page.on("websocket", lambda socket: sockets.append(socket))
    log_in(page, live_url)
    page.click("#kb-activity-link")
    page.wait_for_selector("#kb-connection.kb-live")
    # Stored while the channel layer failed: in the trail, never published.
    unpublished = AuditEvent.objects.create(
        action="agent.approved", actor_type=ActorType.ADMIN, actor="alice", agent="ghost"
    )
    row = page.locator("#kb-feed tbody tr.kb-event", has_text="ghost")
    assert row.count() == 0
    # What the publishing process sends once the layer works again (audit/publish.py); from
    # another thread, as this one runs Playwright's event loop.
    notice = {"type": MISSED_TYPE, "since": unpublished.created_at.isoformat()}
    with ThreadPoolExecutor(1) as thread:
        send = async_to_sync(get_channel_layer().group_send)
        thread.submit(send, ACTIVITY_GROUP, notice).result(timeout=10)
    row.wait_for()
    assert row.get_attribute("data-action") == "agent.approved"
    # Reloaded over the open socket's notice, not by reconnecting after it broke.
    assert len(sockets) == 1
    assert not sockets[0].is_closed()
