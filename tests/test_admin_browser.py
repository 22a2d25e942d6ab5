"""The admin as a person uses it: a real Chromium against a real server."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model

from tests.conftest import ARTIFACTS

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
