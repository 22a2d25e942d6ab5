"""The admin as a person uses it: a real Chromium against a real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model

from audit.models import AuditEvent
from broker.models import Backend, Token
from broker.services.tokens import token_revoke
from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key
from tests.proxy_cast import audit_drained, proxied_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

HELLO = [{"role": "user", "content": "Hello"}]


def test_alice_logs_in_to_the_admin_with_its_styles(page: Any, live_url: str) -> None:
    log_in(page, live_url)
    page.wait_for_selector("#site-name")
    assert "keybroker" in page.inner_text("#site-name")
    assert "Credentials, agents and activity" in page.content()
    # The admin's stylesheet was served (the header is coloured, not unstyled).
    header_colour = page.eval_on_selector("#header", "e => getComputedStyle(e).backgroundColor")
    assert header_colour not in {"rgba(0, 0, 0, 0)", "transparent"}
    page.screenshot(path=str(ARTIFACTS / "admin-index.png"), full_page=True)
    page.click("text=API docs")
    page.wait_for_selector(".swagger-ui .info")
    assert "/v1/admin/backends/" in page.content()


def test_charlie_with_a_wrong_password_stays_out(page: Any, live_url: str) -> None:
    log_in(page, live_url, password="not-the-password")
    page.wait_for_selector(".errornote")
    assert "/admin/login/" in page.url


def test_alice_adds_a_backend_and_validates_it_from_the_list(
    page: Any, live_url: str, fake_anthropic: FakeAnthropic
) -> None:
    key = api_key(tail="Br0w")
    fake_anthropic.valid_keys.add(key)
    log_in(page, live_url, next_path="/admin/broker/backend/add/")
    page.fill("#id_name", "anthropic")
    page.fill("#id_base_url", fake_anthropic.url)
    page.fill("#id_new_secret", key)
    assert page.get_attribute("#id_new_secret", "type") == "password"
    page.click("input[name=_save]")
    page.wait_for_selector(".kb-status")
    page.check("input[name=_selected_action]")
    page.select_option("select[name=action]", "validate_now")
    page.click("button[name=index]")
    page.wait_for_selector(".kb-status-valid")
    assert "sk-ant-api03-…Br0w" in page.inner_text("#result_list")
    assert key not in page.content()
    page.screenshot(path=str(ARTIFACTS / "admin-backends.png"), full_page=True)
    assert Backend.objects.get().validation_state == "valid"


def test_a_backend_alice_deletes_in_the_admin_is_refused_by_the_proxy_at_once(
    page: Any, live_url: str, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PUBLIC_URL = live_url
    alice = get_user_model().objects.get(username="alice")
    proxied = proxied_for(live_url=live_url, fake=fake_anthropic, alice=alice)
    body = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": HELLO}

    def call(backend: str = "anthropic") -> httpx.Response:
        return httpx.post(
            f"{live_url}/v1/proxy/{backend}/v1/messages",
            json=body,
            headers={"x-api-key": proxied.token, "anthropic-version": "2023-06-01"},
            timeout=30,
        )

    # The proxy has seen the token and the backend's route, and keeps both for the next call.
    assert call().status_code == 200
    # backend_remove refuses while the backend has live tokens: the agent's token dies first.
    token_revoke(token=Token.objects.get(pk=proxied.token_id))
    revoked = call()
    assert revoked.status_code == 401

    log_in(page, live_url, next_path=f"/admin/broker/backend/{proxied.backend.pk}/delete/")
    page.wait_for_selector("text=Are you sure")
    page.click("input[type=submit]")
    page.wait_for_selector(".messagelist .success")
    assert not Backend.objects.filter(name="anthropic").exists()
    assert AuditEvent.objects.filter(action="backend.removed", backend="anthropic").exists()

    # The very next call is refused as for a backend that never was: the proxy kept neither
    # the token (it went with its backend) nor the route.
    after = call()
    never_was = call("never-was")
    assert after.status_code == never_was.status_code == 401
    assert after.json() == never_was.json()
    assert after.json()["error"]["message"] != revoked.json()["error"]["message"]
    assert len(fake_anthropic.requests) == 1  # nothing reached the upstream after the first
    audit_drained()
