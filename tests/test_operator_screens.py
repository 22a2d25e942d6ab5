"""Every admin page a new operator opens, at 1,400 by 900 as on a laptop (issue 20, item 6):
nothing overflows its page, the forms show only what applies, and each page's screenshot is
kept in docs/screenshots/ (`make screenshots` runs this file to write them there)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import AbstractBaseUser

from broker.models import Agent, Backend, Token
from broker.services.admin_tokens import admintoken_create
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.oidc import oidc_client_create
from broker.services.tokens import token_issue
from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key
from tests.proxy_cast import audit_drained

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# `make screenshots` writes them into docs/screenshots/ (committed); a plain test run keeps
# them with the other browser artifacts, so running the suite leaves the checkout clean.
SCREENSHOTS = Path(os.environ.get("KEYBROKER_SCREENSHOTS_DIR") or ARTIFACTS / "screens")
WIDTH, HEIGHT = 1400, 900


@pytest.fixture
def wide(browser: Any, live_url: str, alice: AbstractBaseUser) -> Iterator[Any]:
    """A laptop-sized page with alice logged in."""
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
    log_in(page, live_url)
    page.wait_for_selector("#site-name")
    yield page
    page.close()


@pytest.fixture
def alice(django_user_model: Any) -> AbstractBaseUser:
    from tests.browser import ALICE_PASSWORD

    user: AbstractBaseUser = django_user_model.objects.create_superuser(
        "alice", password=ALICE_PASSWORD
    )
    return user


@pytest.fixture
def world(
    live_url: str, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser, settings: Any
) -> Iterator[dict[str, Any]]:
    """What a week-old install holds: two backends, agents in each state, tokens, calls."""
    settings.PUBLIC_URL = live_url
    key = api_key(tail="Scr1")
    fake_anthropic.valid_keys.add(key)
    anthropic = backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    backend_add(name="anthropic-staging", secret=api_key(tail="Scr2"), base_url=fake_anthropic.url)
    ci = agent_enroll(
        name="ci-runner-with-a-long-name",
        scopes=["anthropic"],
        description="nightly evals on the ci-7 machine",
        approved_by=alice,
    ).agent
    agent_enroll(name="laptop-bob", scopes=["anthropic", "anthropic-staging"])
    tokens = [token_issue(agent=ci, backend_name="anthropic", ttl="30m") for _ in range(3)]
    for issued in tokens[:2]:
        answer = httpx.post(
            f"{live_url}/v1/proxy/anthropic/v1/messages",
            json={
                "model": "claude-haiku-4-5",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "Hello"}],
            },
            headers={"x-api-key": issued.plaintext, "anthropic-version": "2023-06-01"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
    admintoken_create(name="laptop", username="alice")
    oidc_client_create(agent=ci, address="127.0.0.1")
    audit_drained()
    yield {"backend": anthropic, "agent": ci, "token": tokens[0].token}
    audit_drained()


def shoot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def fits(page: Any) -> None:
    """Nothing wider than the window: no column cut off, no sideways scrolling."""
    overflow = page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= WIDTH, f"{page.url} is {overflow}px wide at a {WIDTH}px window"


def one_line_rows(page: Any) -> None:
    """Each row of a list is one line: long names are cut (whole in their tooltip)."""
    heights = page.eval_on_selector_all(
        "#result_list tbody tr", "rows => rows.map(r => r.getBoundingClientRect().height)"
    )
    assert heights, f"{page.url} lists nothing"
    assert max(heights) < 45, f"{page.url} has rows {max(heights)}px tall"


def test_every_page_fits_a_laptop_and_is_kept_as_a_screenshot(
    world: dict[str, Any], wide: Any, live_url: str
) -> None:
    pages = {
        "admin-index": "/admin/",
        "backends": "/admin/broker/backend/",
        "backend-add": "/admin/broker/backend/add/",
        "backend-change": f"/admin/broker/backend/{world['backend'].pk}/change/",
        "agents": "/admin/broker/agent/",
        "agent-change": f"/admin/broker/agent/{world['agent'].pk}/change/",
        "tokens": "/admin/broker/token/",
        "token-change": f"/admin/broker/token/{world['token'].pk}/change/",
        "admin-tokens": "/admin/broker/admintoken/",
        "oidc-clients": "/admin/broker/oidcclient/",
        "audit-events": "/admin/audit/auditevent/",
        "activity": "/activity/",
        "api-docs": "/api/docs/",
    }
    for name, path in pages.items():
        wide.goto(f"{live_url}{path}")
        wide.wait_for_load_state("networkidle")
        shoot(wide, name)
        fits(wide)
        if wide.locator("#result_list").count():
            one_line_rows(wide)
    assert Token.objects.count() == 3
    assert Agent.objects.count() == 2
    assert Backend.objects.count() == 2


def test_the_pages_say_what_they_mean(world: dict[str, Any], wide: Any, live_url: str) -> None:
    wide.goto(f"{live_url}/admin/")
    assert "OIDC clients" in wide.inner_text("#content-main")
    assert "Oidc clients" not in wide.content()
    # Admin tokens are revoked, as the CLI says, never deleted.
    wide.goto(f"{live_url}/admin/broker/admintoken/")
    options = wide.eval_on_selector_all(
        "select[name=action] option", "options => options.map(o => o.textContent)"
    )
    assert options == ["---------", "Revoke selected admin tokens"]
    # A cut name keeps the whole in its tooltip.
    wide.goto(f"{live_url}/admin/broker/token/")
    cut = wide.locator("#result_list .kb-cut").first
    assert cut.get_attribute("title") == "ci-runner-with-a-long-name"


def test_the_backend_form_shows_only_what_its_kind_takes(wide: Any, live_url: str) -> None:
    wide.goto(f"{live_url}/admin/broker/backend/add/")
    federation = wide.locator("fieldset.kb-federation")
    secret = wide.locator(".field-new_secret")
    # A plain key: the key and its box, no workload identity, nothing read-only.
    assert secret.is_visible()
    assert wide.locator(".field-allow_invalid").is_visible()
    assert not federation.is_visible()
    assert wide.locator(".field-status, .field-secret_fingerprint").count() == 0
    wide.select_option("#id_kind", "anthropic-wif")
    assert federation.is_visible()
    assert not secret.is_visible()
    assert not wide.locator(".field-client_key").is_visible()
    shoot(wide, "backend-add-workload-identity")
    wide.select_option("#id_kind", "anthropic")
    wide.check("#id_client_key")
    assert not secret.is_visible()  # the agents bring their own keys
    assert not federation.is_visible()
