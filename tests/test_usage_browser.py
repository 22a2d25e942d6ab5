"""The usage page as alice uses it: a real Chromium against a real server, with calls made
through the real proxy and a week of history, rolled up by the real task. The screenshots
it takes are the ones in docs/screenshots/ (`make screenshots`)."""

from __future__ import annotations

import os
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from audit.tasks import usage_rollup_task
from audit.usage import UsageQuery, usage_report
from broker.models import Grant
from broker.services.agents import agent_enroll
from broker.services.policy import grant_update
from broker.services.tokens import token_issue
from tests.browser import ARTIFACTS, log_in
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import audit_drained, proxied_for
from tests.usage_cast import call, refused

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# `make screenshots` writes them into docs/screenshots/ (committed); a plain test run keeps
# them with the other browser artifacts, so running the suite leaves the checkout clean.
SCREENSHOTS = Path(os.environ.get("KEYBROKER_SCREENSHOTS_DIR") or ARTIFACTS / "screens")
MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 8,
           "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for folder in (SCREENSHOTS, ARTIFACTS):
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def seed_history(agents: dict[str, Any]) -> None:
    """A week of calls as the recorder would have written them: several agents and models,
    errors, refusals and a call no price table knows."""
    now = timezone.now()
    models = {"bob": "claude-sonnet-4-5", "carol": "claude-haiku-4-5", "dave": "claude-opus-4-1"}
    for day in range(1, 7):
        for name, agent in agents.items():
            for n in range(day % 3 + (3 if name == "bob" else 1)):
                when = now - timedelta(days=day, hours=n)
                call(agent, model=models[name], created_at=when, input_tokens=400 * (n + 1),
                     output_tokens=120 * (n + 1), cache_read_tokens=1000 if name == "bob" else 0,
                     cost_usd=Decimal("0.0123") * (n + 1), ttfb_ms=180.0 + 90 * n)  # fmt: skip
        failed = now - timedelta(days=day)
        call(agents["dave"], status=529, outcome="upstream_error", created_at=failed)
        if day % 2:
            refused(agents["carol"], created_at=now - timedelta(days=day, hours=2))
    call(agents["dave"], model="claude-mystery", input_tokens=50, output_tokens=5, cost_usd=None,
         created_at=now - timedelta(days=2))  # fmt: skip


def test_alice_reads_usage_by_agent_and_model_with_budgets_and_filters(
    page: Any, live_url: str, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PUBLIC_URL = live_url
    alice = get_user_model().objects.get(username="alice")
    carol = proxied_for(live_url=live_url, fake=fake_anthropic, alice=alice, name="carol")
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    dave = agent_enroll(name="dave", scopes=["anthropic"], approved_by=alice).agent
    grant = Grant.objects.get(agent=bob, backend__name="anthropic")
    grant_update(grant=grant, policy={"daily_tokens": 100, "daily_usd": "0.50",
                                      "monthly_usd": "20"})  # fmt: skip
    bob_token = token_issue(agent=bob, backend_name="anthropic", ttl="30m").plaintext
    proxy = httpx.Client(base_url=carol.base_url, timeout=10)
    for token in (bob_token, bob_token, bob_token, carol.token):
        assert proxy.post("/v1/messages", json=MESSAGE, headers={"x-api-key": token}).is_success
    audit_drained()
    seed_history({"bob": bob, "carol": Grant.objects.get(agent__name="carol").agent, "dave": dave})
    usage_rollup_task.apply()
    expected = usage_report(UsageQuery.parse({"since": "7d", "group_by": "agent"}))

    log_in(page, live_url)
    page.click("#kb-usage-link a")
    page.wait_for_url("**/usage/")
    page.wait_for_function("window.kbCharts && window.kbCharts.rates")
    assert page.locator("#kb-total-calls").inner_text() == str(expected["totals"]["calls"])
    assert "+ 1 call unknown" in page.locator("#kb-total-cost").inner_text()

    # The top agents, biggest first, as the API counts them.
    rows = page.locator("#kb-top-agents tbody tr.kb-agent-row")
    shown = [
        (row.locator(".kb-agent").inner_text(), int(row.locator(".kb-calls").inner_text()))
        for row in rows.all()
    ]
    assert shown == [(row["agent"], row["calls"]) for row in expected["groups"]]
    assert shown[0][0] == "bob"

    # What the charts drew: per agent, the calls of each day add up to its total.
    drawn = page.evaluate(
        "Object.fromEntries(kbCharts.agents.data.datasets.map("
        "d => [d.label, d.data.reduce((a, b) => a + b, 0)]))"
    )
    assert drawn == {row["agent"]: row["calls"] for row in expected["groups"]}
    assert page.evaluate("kbCharts.agents.data.labels.length") == 8  # 7 days back, and today
    by_model = page.evaluate("kbCharts.models.data.datasets.map(d => d.label)")
    assert set(by_model) == {"claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1",
                             "claude-mystery"}  # fmt: skip
    rates = page.evaluate("kbCharts.rates.data.datasets.map(d => d.data.filter(v => v > 0).length)")
    assert rates[0] >= 6  # dave's errors, every day
    assert rates[1] >= 3  # carol's refusals, every other day
    shot(page, "usage-overview")
    # Cost instead of calls: the same charts, in dollars.
    page.click("#kb-metric-switch button[data-metric=cost]")
    cost = page.evaluate(
        "kbCharts.agents.data.datasets.reduce((s, d) => s + d.data.reduce((a, b) => a + b, 0), 0)"
    )
    assert cost == pytest.approx(float(expected["totals"]["cost_usd"]), abs=1e-6)

    # Bob's budget bar: the three real calls today count against his daily tokens.
    budget = page.locator(".kb-budget[data-agent=bob] [data-budget=daily_tokens]")
    assert budget.locator(".kb-budget-text").inner_text() == "63 of 100"
    assert page.locator(".kb-budget[data-agent=bob] [data-budget=monthly_usd]").count() == 1
    shot(page, "usage-cost")

    # Narrowed to one model, by the picker.
    page.select_option("#kb-filter-model", "claude-haiku-4-5")
    page.wait_for_url("**model=claude-haiku-4-5**")
    page.wait_for_function("window.kbCharts && window.kbCharts.rates")
    haiku = usage_report(UsageQuery.parse({"since": "7d", "model": "claude-haiku-4-5"}))
    assert page.locator("#kb-total-calls").inner_text() == str(haiku["totals"]["calls"])
    assert page.evaluate("kbCharts.models.data.datasets.map(d => d.label)") == ["claude-haiku-4-5"]
    shot(page, "usage-filtered")

    # A bad filter says so, and shows the unfiltered page.
    page.goto(f"{live_url}/usage/?range=1y")
    assert "range: one of 24h, 7d, 30d" in page.locator("#kb-usage-error").inner_text()
    assert bob_token not in page.content()
