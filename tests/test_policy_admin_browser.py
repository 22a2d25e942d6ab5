"""alice limits bob from his agent page in a real Chromium, and the proxy holds him to it."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from django.contrib.auth import get_user_model

from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import audit_drained, proxied_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

HELLO = [{"role": "user", "content": "Hello"}]


def test_alice_sets_bobs_models_and_rpm_inline_and_the_proxy_enforces_them(
    page: Any,
    live_url: str,
    fake_anthropic: FakeAnthropic,
    settings: Any,
) -> None:
    settings.PUBLIC_URL = live_url
    alice = get_user_model().objects.get(username="alice")
    bob = proxied_for(live_url=live_url, fake=fake_anthropic, alice=alice)
    log_in(page, live_url, next_path="/admin/broker/agent/")
    page.locator("#result_list a", has_text="bob").click()
    row = page.locator("#kb-policy-anthropic")
    row.locator("input[name$='-models']").fill("claude-haiku-*")
    row.locator("input[name$='-rpm']").fill("2")
    row.locator("button.kb-save-policy").click()
    saved = page.wait_for_selector(".messagelist .success")
    assert "Policy of bob → anthropic saved" in saved.inner_text()
    page.screenshot(path=str(ARTIFACTS / "admin-agent-policy.png"), full_page=True)

    client = anthropic.Anthropic(base_url=bob.base_url, api_key=bob.token, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.create(model="claude-opus-4-1", max_tokens=8, messages=HELLO)
    for _ in range(2):
        client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HELLO)
    assert len(fake_anthropic.requests) == 2
    audit_drained()
