"""The admin as a person uses it: a real Chromium against a real server."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model

from broker.models import Backend
from tests.conftest import ARTIFACTS
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_alice_logs_in_to_the_admin_with_its_styles(browser: Any, live_url: str) -> None:
    get_user_model().objects.create_superuser("alice", password="alice-pw-123")
    page = browser.new_page()
    try:
        page.goto(f"{live_url}/admin/")
        page.fill("#id_username", "alice")
        page.fill("#id_password", "alice-pw-123")
        page.click("input[type=submit]")
        page.wait_for_selector("#site-name")
        assert "keybroker" in page.inner_text("#site-name")
        assert "Credentials, agents and activity" in page.content()
        page.click("text=API docs")
        page.wait_for_selector(".swagger-ui .info")
        assert "/v1/admin/backends/" in page.content()
        page.go_back()
        # The admin's stylesheet was served (the header is coloured, not unstyled).
        header_colour = page.eval_on_selector("#header", "e => getComputedStyle(e).backgroundColor")
        assert header_colour not in {"rgba(0, 0, 0, 0)", "transparent"}
        page.screenshot(path=str(ARTIFACTS / "admin-index.png"), full_page=True)
    finally:
        page.close()


def test_charlie_with_a_wrong_password_stays_out(browser: Any, live_url: str) -> None:
    get_user_model().objects.create_superuser("alice", password="alice-pw-123")
    page = browser.new_page()
    try:
        page.goto(f"{live_url}/admin/")
        page.fill("#id_username", "alice")
        page.fill("#id_password", "not-the-password")
        page.click("input[type=submit]")
        page.wait_for_selector(".errornote")
        assert "/admin/login/" in page.url
    finally:
        page.close()


def test_alice_adds_a_backend_and_validates_it_from_the_list(
    browser: Any, live_url: str, fake_anthropic: FakeAnthropic
) -> None:
    get_user_model().objects.create_superuser("alice", password="alice-pw-123")
    key = api_key(tail="Br0w")
    fake_anthropic.valid_keys.add(key)
    page = browser.new_page()
    try:
        page.goto(f"{live_url}/admin/login/?next=/admin/broker/backend/add/")
        page.fill("#id_username", "alice")
        page.fill("#id_password", "alice-pw-123")
        page.click("input[type=submit]")
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
    finally:
        page.close()
    assert Backend.objects.get().validation_state == "valid"
