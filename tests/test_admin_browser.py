"""The admin as a person uses it: a real Chromium against a real server."""

from __future__ import annotations

from typing import Any

import pytest

from broker.models import Backend
from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


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
