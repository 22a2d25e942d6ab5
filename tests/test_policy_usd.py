"""USD budgets on bob's grant (issue 17): a daily and a monthly budget, counted from each
call's cost in Redis, shared by every process, checked before a call like daily_tokens;
bad amounts refused over REST; what is left of them in /v1/status."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest
from django.test import Client

from audit.models import AuditEvent
from broker.infra.redis import redis_client
from broker.models import Agent, Backend
from broker.prices import call_cost
from broker.selectors.policy import USAGE_CLOCK, policy_left, usage_key
from broker.services.agents import agent_approve
from broker.services.policy import grant_policy
from proxy.policy import PolicyDenied, PolicyGate
from tests.agents import as_agent, enroll, send
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained, loop_audit_dropped
from tests.test_policy_api import bobs_grant, grant_url
from tests.test_policy_proxy import HAIKU, HELLO, sdk, set_policy
from tests.waiting import wait_until


def spent(kind: str) -> str | None:
    entry = policy_left(grant_policy(bobs_grant()))[kind]
    return None if entry is None else entry["used"]


def wait_until_spent(kind: str, expected: str) -> None:
    """Costs are counted just after a call ends, off the response path: wait for it."""
    wait_until(
        lambda: spent(kind) == expected,
        timeout=5,
        what=lambda: f"{kind} spend of {expected} (it is {spent(kind)})",
    )


def one_call_costs() -> Decimal:
    """What one of the fake's haiku answers costs: 12 in, 3 from the cache, 6 out."""
    cost = call_cost(HAIKU, {"input_tokens": 12, "cache_read_input_tokens": 3, "output_tokens": 6})
    assert cost == Decimal("0.000042")  # 12 at $1, 6 at $5, 3 at $0.10 per million
    return cost


def costs_audited() -> list[Decimal | None]:
    audit_drained()
    return [
        event.cost_usd for event in AuditEvent.objects.filter(action="proxy.request").order_by("id")
    ]


def refusal(limited: pytest.ExceptionInfo[anthropic.RateLimitError]) -> tuple[str, int, str]:
    headers = limited.value.response.headers
    message = limited.value.body["error"]["message"]  # type: ignore[index]
    return message, int(headers["retry-after"]), headers["x-should-retry"]


def seconds_to(when: dt.datetime) -> float:
    return (when - dt.datetime.now(dt.UTC)).total_seconds()


def next_midnight() -> dt.datetime:
    today = dt.datetime.now(dt.UTC).date()
    return dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), dt.UTC)


def next_month() -> dt.datetime:
    today = dt.datetime.now(dt.UTC).date()
    first = dt.date(today.year + today.month // 12, today.month % 12 + 1, 1)
    return dt.datetime.combine(first, dt.time(), dt.UTC)


# --- through the proxy ----------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_spent_daily_usd_budget_refuses_the_next_call(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_usd="0.00008")  # just under two calls' worth
    client = sdk(proxied)
    cost = one_call_costs()
    client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    wait_until_spent("daily_usd", "0.000042")
    with client.messages.stream(model=HAIKU, max_tokens=8, messages=HELLO) as stream:
        stream.get_final_message()
    # A stream costs what its usage says: 12 in, 3 from the cache, 10 out here.
    stream_cost = call_cost(
        HAIKU, {"input_tokens": 12, "cache_read_input_tokens": 3, "output_tokens": 10}
    )
    assert stream_cost is not None
    total = cost + stream_cost
    wait_until_spent("daily_usd", f"{total.normalize():f}")

    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    message, retry_after, should_retry = refusal(limited)
    assert message == (
        f"policy daily_usd: ${total.normalize():f} of the daily budget of $0.00008 spent for "
        f"agent bob on anthropic; it renews at 00:00 UTC, in {retry_after}s"
    )
    assert abs(retry_after - seconds_to(next_midnight())) <= 5
    assert should_retry == "false"  # waiting until midnight is not a retry
    assert len(fake_anthropic.requests) == 2
    # The budget counted the very costs the audit shows.
    assert costs_audited() == [cost, stream_cost]
    (denied,) = AuditEvent.objects.filter(action="policy.denied")
    assert (denied.status, denied.detail["policy_rule"]) == (429, "daily_usd")


@pytest.mark.django_db(transaction=True)
def test_two_processes_share_one_usd_budget(
    proxied: Proxied, fake_anthropic: FakeAnthropic, second_process: str
) -> None:
    set_policy(daily_usd="0.00008")
    here = sdk(proxied)
    there = sdk(proxied, base_url=f"{second_process}/v1/proxy/anthropic")
    here.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    wait_until_spent("daily_usd", "0.000042")
    there.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    wait_until_spent("daily_usd", "0.000084")  # the other process counted into the same day
    for client in (there, here):
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
        assert "policy daily_usd: $0.000084 of the daily budget of $0.00008" in (
            limited.value.message
        )
    assert len(fake_anthropic.requests) == 2


@pytest.mark.django_db(transaction=True)
def test_a_spent_monthly_usd_budget_refuses_until_the_first_of_next_month(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(monthly_usd="0.00004", daily_usd="25")
    client = sdk(proxied)
    client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    wait_until_spent("monthly_usd", "0.000042")
    assert spent("daily_usd") == "0.000042"  # one cost, counted in the day and the month
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    message, retry_after, should_retry = refusal(limited)
    renews = next_month()
    assert message == (
        f"policy monthly_usd: $0.000042 of the monthly budget of $0.00004 spent for agent bob "
        f"on anthropic; it renews on {renews:%Y-%m-%d} 00:00 UTC, in {retry_after}s"
    )
    assert abs(retry_after - seconds_to(renews)) <= 5
    assert should_retry == "false"
    assert len(fake_anthropic.requests) == 1
    # The month's counter goes when the month does.
    month_ttl = redis_client().pttl(f"{_usage_base()}:usd:month:{dt.datetime.now(dt.UTC):%Y%m}")
    assert 0 < month_ttl / 1000 - seconds_to(renews) <= 6


def _usage_base() -> str:
    return usage_key(grant_policy(bobs_grant()))


@pytest.mark.django_db(transaction=True)
def test_a_model_without_a_price_is_admitted_and_costs_the_budget_nothing(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_usd="0.00004")
    client = sdk(proxied)
    for _ in range(3):  # each would spend the budget, had it a price
        client.messages.create(model="mystery-model-1", max_tokens=8, messages=HELLO)
    client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    wait_until_spent("daily_usd", "0.000042")
    assert costs_audited() == [None, None, None, Decimal("0.000042")]
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    assert "policy daily_usd: $0.000042 of the daily budget" in limited.value.message
    assert len(fake_anthropic.requests) == 4


# --- the gate -------------------------------------------------------------------------------
@pytest.fixture
def bob(anthropic: Backend) -> tuple[Agent, str]:
    agent, vend_token = enroll("bob")
    agent_approve(agent=agent, by=None)
    return agent, vend_token


def spend(cost: Decimal | None) -> bool:
    """One call of bob's through the proxy's gate, costing ``cost``, as the proxy counts it;
    whether anything was sent to Redis to count."""

    policy = grant_policy(bobs_grant())

    async def call() -> bool:
        gate = PolicyGate()
        ticket = await gate.admit(policy, agent="bob", backend="anthropic")
        assert ticket is not None
        counting = gate.settle(ticket, {"input_tokens": 10, "output_tokens": 1}, cost)
        if counting is None:
            return False
        await counting
        loop_audit_dropped()
        return True

    return asyncio.run(call())


@pytest.mark.django_db
def test_an_unknown_cost_counts_nothing_and_is_not_refused(bob: tuple[Agent, str]) -> None:
    set_policy(daily_usd="1", monthly_usd="2")
    assert spend(None) is False  # no Redis call at all: nothing to add
    assert (spent("daily_usd"), spent("monthly_usd")) == ("0.00", "0.00")
    assert spend(Decimal("0.75")) is True
    assert (spent("daily_usd"), spent("monthly_usd")) == ("0.75", "0.75")


@pytest.mark.django_db
def test_the_gate_refuses_a_spent_budget_not_retryable(bob: tuple[Agent, str]) -> None:
    set_policy(daily_usd="0.50")
    spend(Decimal("0.5"))
    with pytest.raises(PolicyDenied) as refused:
        spend(Decimal("0.01"))
    assert (refused.value.status, refused.value.rule) == (429, "daily_usd")
    assert (b"x-should-retry", b"false") in refused.value.headers
    assert "$0.50 of the daily budget of $0.50 spent for agent bob on anthropic" in (
        refused.value.message
    )


@pytest.mark.django_db
def test_bob_reads_his_usd_budgets_and_what_is_left(bob: tuple[Agent, str]) -> None:
    _, vend_token = bob
    set_policy(daily_usd="25", monthly_usd="100.5")
    spend(Decimal("0.5"))
    spend(Decimal("1.234567"))

    (grant,) = as_agent(vend_token).get("/v1/status").json()["grants"]
    daily, monthly = grant["limits"]["daily_usd"], grant["limits"]["monthly_usd"]
    assert (daily["limit"], daily["used"], daily["remaining"]) == ("25.00", "1.734567", "23.265433")
    assert abs(daily["resets_in"] - seconds_to(next_midnight())) <= 5
    assert (monthly["limit"], monthly["used"], monthly["remaining"]) == (
        "100.50", "1.734567", "98.765433",
    )  # fmt: skip
    assert abs(monthly["resets_in"] - seconds_to(next_month())) <= 5
    assert grant["limits"]["daily_tokens"] is None


# --- over REST ------------------------------------------------------------------------------
@pytest.mark.django_db
def test_alice_sets_usd_budgets_and_the_backends_default(
    admin_api: Client, bob: tuple[Agent, str]
) -> None:
    agent, _ = bob
    defaults = send(admin_api, "patch", "/v1/admin/backends/anthropic/policy", {"daily_usd": 10})
    assert defaults.status_code == 200, defaults.content
    assert defaults.json()["defaults"]["daily_usd"] == "10.00"
    changed = send(admin_api, "patch", grant_url(agent), {"monthly_usd": "250.125"})
    assert changed.status_code == 200, changed.content
    body = changed.json()
    assert (body["policy"]["monthly_usd"], body["policy"]["daily_usd"]) == ("250.125", None)
    assert (body["effective"]["monthly_usd"], body["effective"]["daily_usd"]) == (
        "250.125", "10.00",
    )  # fmt: skip
    assert (body["sources"]["monthly_usd"], body["sources"]["daily_usd"]) == ("grant", "backend")
    policy = grant_policy(bobs_grant())
    assert (policy.monthly_usd, policy.daily_usd) == (Decimal("250.125"), Decimal(10))
    (event,) = AuditEvent.objects.filter(action="grant.updated")
    assert event.detail == {"policy": {"monthly_usd": "250.125"}}


@pytest.mark.django_db
def test_usd_budgets_are_in_the_schema() -> None:
    schema = Client().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    components = schema["components"]["schemas"]
    for name in (
        "PatchedGrantPolicyInputRequest",
        "PatchedBackendPolicyInputRequest",
        "PolicyValuesOutput",
        "GrantLimitsOutput",
    ):
        for field in ("daily_usd", "monthly_usd"):
            assert field in components[name]["properties"], (name, field)
    amount = components["PatchedGrantPolicyInputRequest"]["properties"]["daily_usd"]
    assert (amount["type"], amount["format"], amount.get("nullable")) == ("string", "decimal", True)
    assert components["UsdLeftOutput"]["properties"]["used"]["type"] == "string"


# --- the month in Lua -----------------------------------------------------------------------
# The script's clock, fed a chosen time instead of Redis' TIME: the month it works out and
# the day the next one starts on, for dates across leap years and century rules.
_AT = USAGE_CLOCK.replace("redis.call('TIME')", "{ARGV[3], '0'}") + "return {m, month_end}"


@pytest.mark.parametrize(
    "when",
    [
        "1970-01-01", "1999-12-31", "2000-02-28", "2000-02-29", "2000-03-01", "2024-02-29",
        "2025-02-28", "2025-03-01", "2026-04-30", "2026-12-31", "2027-01-01", "2100-02-28",
        "2100-03-01", "2400-02-29",
    ],
)  # fmt: skip
def test_the_scripts_know_the_utc_month_and_when_it_ends(when: str) -> None:
    day = dt.date.fromisoformat(when)
    nxt = dt.date(day.year + day.month // 12, day.month % 12 + 1, 1)
    epoch = dt.date(1970, 1, 1)
    for second in (0, 86_399):  # the day's first and last second
        at = (day - epoch).days * 86_400 + second
        month, month_end = redis_client().eval(_AT, 0, "k", 60, at)
        assert (month.decode(), month_end) == (f"{day:%Y%m}", (nxt - epoch).days), when


def test_the_month_of_every_day_of_four_hundred_years_in_one_script() -> None:
    # One EVAL for every day from 2000 to 2400: the loop is in Lua, the check in Python.
    script = (
        "local out = {} for i = 0, tonumber(ARGV[4]) - 1 do ARGV[3] = (tonumber(ARGV[5]) + i) "
        "* 86400 "
        + _AT.replace("return {m, month_end}", "out[#out + 1] = m .. ':' .. month_end")
        + " end return out"
    )
    start = dt.date(2000, 1, 1)
    days = 146_097  # four hundred years, one whole cycle of the calendar
    epoch = dt.date(1970, 1, 1)
    got = redis_client().eval(script, 0, "k", 60, 0, days, (start - epoch).days)
    assert len(got) == days
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        nxt = dt.date(day.year + day.month // 12, day.month % 12 + 1, 1)
        assert got[offset] == f"{day:%Y%m}:{(nxt - epoch).days}".encode(), day


@pytest.mark.django_db(transaction=True)
def test_a_batch_costs_the_budget_its_results_discounted_price(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any, tmp_path: Path
) -> None:
    # The fake's results name the model "claude": priced by an operator's table of its own.
    prices = tmp_path / "prices.toml"
    prices.write_text(
        'batch_discount = 0.5\n[models."claude"]\ninput = 10\noutput = 50\ncache_read = 1\n'
    )
    settings.PRICES_FILE = str(prices)
    set_policy(daily_usd="1", monthly_usd="2")
    client = sdk(proxied)
    params = {"model": HAIKU, "max_tokens": 100, "messages": HELLO}
    batch = client.messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": params} for i in range(4)]  # type: ignore[misc]
    )
    assert len(list(client.messages.batches.results(batch.id))) == 4
    # Four answers of 12 in, 3 from the cache, 6 out, at half the price.
    cost = Decimal(4 * (12 * 10 + 3 * 1 + 6 * 50)) / 1_000_000 / 2
    assert costs_audited()[-1] == cost
    wait_until_spent("monthly_usd", f"{cost.normalize():f}")
    assert spent("daily_usd") == f"{cost.normalize():f}"
    # Reading the results again counts nothing more.
    assert len(list(client.messages.batches.results(batch.id))) == 4
    audit_drained()
    assert spent("monthly_usd") == f"{cost.normalize():f}"
