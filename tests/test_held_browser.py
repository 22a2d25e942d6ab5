"""Alice approves and denies held calls on the live activity page: a real Chromium against
a real server, bob's calls made by the anthropic SDK, the upstream a fake on a socket."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import pytest
from django.contrib.auth import get_user_model

from audit.models import AuditEvent
from broker.models import Grant
from broker.selectors.held import held_calls_waiting
from broker.services.policy import grant_update
from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import audit_drained, proxied_for
from tests.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

OPUS = "claude-opus-4-1"
HELLO = [{"role": "user", "content": "Hello"}]


def test_alice_approves_one_held_call_and_denies_another_from_the_activity_page(
    page: Any, browser: Any, live_url: str, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PUBLIC_URL = live_url
    alice = get_user_model().objects.get(username="alice")
    proxied = proxied_for(live_url=live_url, fake=fake_anthropic, alice=alice)
    grant = Grant.objects.select_related("agent", "backend").get(agent__name="bob")
    grant_update(grant=grant, policy={"hold": {"models": ["claude-opus-*"], "timeout": 300}})
    client = anthropic.Anthropic(base_url=proxied.base_url, api_key=proxied.token, max_retries=0)

    log_in(page, live_url, next_path="/activity/")
    page.wait_for_selector("#kb-connection.kb-live")
    assert page.locator("#kb-held").is_hidden()  # nothing held: no panel
    # A second tab watches: a decision taken in the first takes the buttons away here too.
    other = browser.new_page()
    log_in(other, live_url, next_path="/activity/")
    other.wait_for_selector("#kb-connection.kb-live")

    with ThreadPoolExecutor(1) as pool:
        approved = pool.submit(client.messages.create, model=OPUS, max_tokens=8, messages=HELLO)
        row = page.locator("#kb-held-calls tr.kb-held")
        row.wait_for()
        assert row.locator(".kb-agent").inner_text() == "bob"
        assert row.locator(".kb-model").inner_text() == OPUS
        assert row.locator(".kb-rule").inner_text() == "models"
        assert "POST /v1/messages" in row.locator(".kb-call").inner_text()
        other.locator("#kb-held-calls tr.kb-held").wait_for()
        page.screenshot(path=str(ARTIFACTS / "activity-held.png"), full_page=True)
        # Held: the SDK waits and the upstream has heard nothing.
        assert not approved.done()
        assert fake_anthropic.requests == []
        row.locator("button.kb-approve-held").click()
        message = approved.result(timeout=15)
    assert message.model == OPUS
    assert [r.path for r in fake_anthropic.requests] == ["/v1/messages"]
    row.wait_for(state="detached")
    other.locator("#kb-held-calls tr.kb-held").wait_for(state="detached")

    with ThreadPoolExecutor(1) as pool:
        denied = pool.submit(client.messages.create, model=OPUS, max_tokens=8, messages=HELLO)
        row = page.locator("#kb-held-calls tr.kb-held")
        row.wait_for()
        row.locator("input.kb-deny-reason").fill("opus is for humans")
        row.locator("button.kb-deny-held").click()
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            denied.result(timeout=15)
    assert "held for approval and denied by alice: opus is for humans" in refused.value.message
    assert len(fake_anthropic.requests) == 1  # the denied call never went upstream
    other.locator("#kb-held-calls tr.kb-held").wait_for(state="detached")
    assert held_calls_waiting() == []

    # The feed shows who decided each, as it happened.
    decided = page.locator("#kb-feed tr.kb-event[data-action='proxy.hold_decided']")
    wait_until(lambda: decided.count() == 2, timeout=10, what="both decisions in the feed")
    assert decided.first.locator(".kb-agent").inner_text() == "bob (by alice)"
    page.screenshot(path=str(ARTIFACTS / "activity-held-decided.png"), full_page=True)
    other.close()
    audit_drained()
    decisions = AuditEvent.objects.filter(action="proxy.hold_decided").order_by("id")
    assert [(e.actor, e.detail["decision"]) for e in decisions] == [
        ("alice", "approved"),
        ("alice", "denied"),
    ]
