"""What a new operator trips over (issue 20), in the admin: a real Chromium, a real server.

Alice pastes a wrong key first, as people do; the admin says so before anything is saved,
and the index keeps telling her while a backend's key does not work.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.models import Agent, AgentStatus, Backend
from broker.services.agents import agent_enroll
from tests.browser import ARTIFACTS, log_in
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_alice_pastes_a_wrong_key_and_the_admin_says_so_before_saving(
    page: Any, live_url: str, fake_anthropic: FakeAnthropic
) -> None:
    wrong, right = api_key(tail="Wr0n"), api_key(tail="R1gt")
    fake_anthropic.valid_keys.add(right)
    host = fake_anthropic.url.removeprefix("http://")
    log_in(page, live_url, next_path="/admin/broker/backend/add/")
    page.fill("#id_name", "anthropic")
    page.fill("#id_base_url", fake_anthropic.url)
    page.fill("#id_new_secret", wrong)
    page.click("input[name=_save]")
    # Refused on its field with the upstream's reason and the way out; nothing saved.
    error = page.wait_for_selector(".field-new_secret .errorlist")
    assert error.inner_text().splitlines() == [
        f"{host} refused this key (upstream answered 401 (authentication_error: invalid "
        "x-api-key)); nothing was saved: check that it is the whole key, of the right account",
        "Tick “Save even if the upstream refuses the key” to save it anyway.",
    ]
    assert not Backend.objects.exists()
    assert wrong not in page.content()

    # She saves it anyway: no green "added successfully", a warning naming the fix.
    page.fill("#id_new_secret", wrong)
    page.check("#id_allow_invalid")
    page.click("input[name=_save]")
    warning = page.wait_for_selector(".messagelist .warning")
    assert warning.text_content() == (
        "Backend anthropic: saved, but invalid: upstream answered 401 (authentication_error: "
        "invalid x-api-key); calls with it fail until it is replaced (`manage.py backend "
        "rotate anthropic`)"
    )
    assert page.locator(".messagelist .success").count() == 0
    assert Backend.objects.get().validation_state == "invalid"

    # The index says which backend does not work, and how to fix it.
    page.goto(f"{live_url}/admin/")
    broken = page.wait_for_selector("#kb-broken")
    text = broken.inner_text()
    assert "Backends that do not work" in text
    assert "anthropic: invalid, refused by the upstream: every call to it fails" in text
    assert "Fix: enter a new key on its page (or `manage.py backend rotate anthropic`)." in text
    page.screenshot(path=str(ARTIFACTS / "admin-index-broken-backend.png"), full_page=True)

    # The right key, entered on the backend's page, is checked and the index clears.
    page.click("#kb-broken a")
    page.fill("#id_new_secret", right)
    page.click("input[name=_save]")
    success = page.wait_for_selector(".messagelist .success")
    assert f"Backend anthropic: valid: {host} accepted the key" in success.text_content()
    assert Backend.objects.get().validation_state == "valid"
    page.goto(f"{live_url}/admin/")
    page.wait_for_selector("#kb-waiting")
    assert page.locator("#kb-broken").count() == 0


def test_an_unreachable_upstream_saves_the_key_and_says_it_is_unchecked(
    page: Any, live_url: str
) -> None:
    log_in(page, live_url, next_path="/admin/broker/backend/add/")
    page.fill("#id_name", "anthropic")
    # Nothing listens there: the check cannot reach the upstream.
    page.fill("#id_base_url", f"http://127.0.0.1:{free_port()}")
    page.fill("#id_new_secret", api_key(tail="Unr3"))
    page.click("input[name=_save]")
    warning = page.wait_for_selector(".messagelist .warning")
    assert "Backend anthropic: saved unchecked: cannot reach 127.0.0.1" in warning.text_content()
    assert "the scheduled validation (every 60 min) checks it again" in warning.text_content()
    assert Backend.objects.get().validation_state == "unreachable"
    page.goto(f"{live_url}/admin/")
    assert "the upstream could not be reached at the last check" in page.inner_text("#kb-broken")


def test_alice_approves_an_agent_from_the_index(page: Any, live_url: str) -> None:
    """Step 7 of the README's tour: the index lists the waiting agent with an Approve."""
    agent_enroll(name="ci-runner", scopes=[])
    log_in(page, live_url)
    row = page.locator("#kb-waiting li", has_text="ci-runner")
    row.locator("button.kb-approve").click()
    success = page.wait_for_selector(".messagelist .success")
    assert "ci-runner approved" in success.text_content()
    assert page.url.rstrip("/").endswith("/admin")
    assert Agent.objects.get(name="ci-runner").status == AgentStatus.APPROVED
    assert "No agents waiting for approval." in page.inner_text("#kb-waiting")
