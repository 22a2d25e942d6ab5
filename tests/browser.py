"""The browser cast: Debian's Chromium, a page with alice the admin, and her log-in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ALICE_PASSWORD = "alice-pw-123"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium driven by Playwright; never downloads a browser.

    Playwright's sync API keeps an event loop running in this thread, which trips Django's
    async-safety check on every ORM call the test makes; the flag is lifted only while a
    browser module runs.
    """
    if not CHROMIUM.exists():
        reason = f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("KEYBROKER_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield instance
        finally:
            instance.close()
            del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture
def page(browser: Any, live_url: str) -> Iterator[Any]:
    """A fresh page, with alice (password ``ALICE_PASSWORD``) created but not logged in."""
    get_user_model().objects.create_superuser("alice", password=ALICE_PASSWORD)
    page = browser.new_page()
    yield page
    page.close()


def log_in(
    page: Any, live_url: str, *, password: str = ALICE_PASSWORD, next_path: str = "/admin/"
) -> None:
    page.goto(f"{live_url}/admin/login/?next={next_path}")
    page.fill("#id_username", "alice")
    page.fill("#id_password", password)
    page.click("input[type=submit]")
