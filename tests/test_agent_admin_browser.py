"""Approvals as alice does them: a real Chromium against a real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from broker.models import Agent, AgentStatus, Backend, Token
from broker.services.agents import agent_enroll, agent_scopes
from broker.services.backends import backend_add
from broker.services.tokens import token_issue
from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def backends(fake_anthropic: FakeAnthropic) -> list[Backend]:
    return [
        backend_add(name=name, secret=api_key(tail="Br0w"), base_url=fake_anthropic.url)
        for name in ("anthropic", "anthropic-staging")
    ]


def test_alice_approves_bob_from_the_list(
    page: Any,
    live_url: str,
    backends: list[Backend],
) -> None:
    """The whole flow over real HTTP, with the approval clicked in the admin."""
    http = httpx.Client(base_url=live_url, timeout=10)
    enrolled = http.post(
        "/v1/enroll", json={"name": "bob", "scopes": ["anthropic"], "description": "CI runner"}
    )
    assert enrolled.status_code == 201
    vend_token = enrolled.json()["vend_token"]
    bob_auth = {"Authorization": f"Bearer {vend_token}"}
    refused = http.post("/v1/credentials/anthropic", json={"ttl": "30m"}, headers=bob_auth)
    assert refused.status_code == 403
    log_in(page, live_url)
    waiting = page.wait_for_selector("#kb-waiting .kb-waiting-count")
    assert waiting.inner_text() == "1 agent waiting for approval"
    page.screenshot(path=str(ARTIFACTS / "admin-agents-index.png"), full_page=True)
    waiting.click()
    row = page.locator("#result_list tr", has_text="bob")
    row.locator(".kb-agent-status-pending").wait_for()
    page.screenshot(path=str(ARTIFACTS / "admin-agents-pending.png"), full_page=True)
    row.locator("button.kb-approve").click()
    success = page.wait_for_selector(".messagelist .success")
    assert "Agent bob approved: granted anthropic" in success.inner_text()
    # Back on the filtered list, where bob no longer waits; the full list shows him approved.
    assert "waiting=yes" in page.url
    page.goto(f"{live_url}/admin/broker/agent/")
    row = page.locator("#result_list tr", has_text="bob")
    row.locator(".kb-agent-status-approved").wait_for()
    page.screenshot(path=str(ARTIFACTS / "admin-agents-list.png"), full_page=True)
    assert vend_token not in page.content()
    bob = Agent.objects.get(name="bob")
    assert (bob.status, agent_scopes(bob)) == (AgentStatus.APPROVED, ["anthropic"])

    minted = http.post("/v1/credentials/anthropic", json={"ttl": "30m"}, headers=bob_auth)
    assert (minted.status_code, minted.json()["ttl"]) == (201, 1800)
    token = minted.json()
    active = http.get("/v1/active", headers=bob_auth).json()
    assert [t["id"] for t in active] == [token["id"]]
    assert http.delete(f"/v1/active/{token['id']}", headers=bob_auth).status_code == 204
    unusable = http.get("/v1/proxy/anthropic/v1/models", headers={"x-api-key": token["token"]})
    assert (unusable.status_code, unusable.json()["error"]["message"]) == (401, "token revoked")


def test_alice_narrows_carols_scopes_then_revokes_her_token(
    page: Any,
    live_url: str,
    backends: list[Backend],
) -> None:
    carol = agent_enroll(name="carol", scopes=["anthropic", "anthropic-staging"]).agent
    change = f"/admin/broker/agent/{carol.pk}/change/"
    log_in(page, live_url, next_path=change)
    page.wait_for_selector("#kb-scopes")
    assert page.is_checked("input[name=scopes][value=anthropic]")
    page.uncheck("input[name=scopes][value=anthropic-staging]")
    page.screenshot(path=str(ARTIFACTS / "admin-agent-narrow.png"), full_page=True)
    page.click("text=Approve with the checked scopes")
    success = page.wait_for_selector(".messagelist .success")
    assert "declined anthropic-staging" in success.inner_text()
    carol.refresh_from_db()
    assert (carol.status, agent_scopes(carol)) == (AgentStatus.APPROVED, ["anthropic"])

    issued = token_issue(agent=carol, backend_name="anthropic")
    page.reload()
    row = page.locator("#kb-tokens tr.kb-token", has_text=issued.token.display_prefix)
    assert row.locator(".kb-token-status-live").count() == 1
    assert issued.plaintext not in page.content()
    row.locator("button.kb-revoke").click()
    success = page.wait_for_selector(".messagelist .success")
    assert f"{issued.token.display_prefix}… revoked" in success.inner_text()
    page.locator("#kb-tokens .kb-token-status-revoked").wait_for()
    page.screenshot(path=str(ARTIFACTS / "admin-agent-change.png"), full_page=True)
    assert Token.objects.get(pk=issued.token.pk).revoked_at is not None
