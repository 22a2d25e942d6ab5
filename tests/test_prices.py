"""What a call costs (issue 17): the shipped price tables, the operator's override, and the
cost on each proxied call's audit event, through the SDK against the fake upstream."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import anthropic
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings

from audit.models import AuditEvent
from broker.prices import CACHE_WRITE_1H, call_cost, price_for
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained

# claude-sonnet-4-5's list prices, USD per million tokens, as broker/prices/anthropic.toml
# ships them: input 3, output 15, 5-minute cache writes 3.75, 1-hour 6, cache reads 0.30.
SONNET = "claude-sonnet-4-5-20250929"
USAGE = {
    "input_tokens": 1_200,
    "output_tokens": 800,
    "cache_read_input_tokens": 10_000,
    "cache_creation_input_tokens": 3_000,
    CACHE_WRITE_1H: 1_000,
}
# 1,200 x 3 + 800 x 15 + 10,000 x 0.30 + 2,000 x 3.75 + 1,000 x 6, per million.
SONNET_COST = Decimal("0.032100")


def test_a_calls_cost_is_its_tokens_at_the_tables_prices() -> None:
    assert call_cost(SONNET, USAGE) == SONNET_COST
    # A message batch's calls cost half.
    assert call_cost(SONNET, USAGE, batch=True) == SONNET_COST / 2
    # OpenAI's cached input is its cache read; it bills no cache writes.
    openai = {"input_tokens": 9_000, "cache_read_input_tokens": 1_000, "output_tokens": 500}
    assert call_cost("gpt-4o-mini-2024-07-18", openai) == Decimal("0.001725")


def test_the_longest_matching_pattern_prices_a_model() -> None:
    opus_45, opus_41 = price_for("claude-opus-4-5-20251101"), price_for("claude-opus-4-1")
    assert opus_45 is not None
    assert opus_41 is not None
    assert (opus_45.input, opus_41.input) == (Decimal(5), Decimal(15))
    mini = price_for("gpt-4o-mini")
    assert mini is not None
    assert mini.pattern == "gpt-4o-mini*"


def test_an_unknown_model_or_an_unpriced_kind_of_token_costs_unknown_never_zero() -> None:
    assert call_cost("claude-nobody-knows", USAGE) is None
    assert call_cost("", USAGE) is None
    # OpenAI's table has no cache-write price: tokens of that kind make the cost unknown.
    assert call_cost("gpt-4o", {"input_tokens": 10, "cache_creation_input_tokens": 5}) is None
    assert call_cost(SONNET, {}) is None  # nothing metered


def test_the_operators_table_wins_over_the_shipped_one(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        'batch_discount = 0.25\n[models."claude-sonnet-4-5*"]\ninput = 1\noutput = 2\n'
        '[models."our-own-model"]\ninput = 10\noutput = 10\n'
    )
    with override_settings(PRICES_FILE=str(prices)):
        assert call_cost(SONNET, {"input_tokens": 1_000_000, "output_tokens": 1_000_000}) == 3
        assert call_cost("our-own-model", {"input_tokens": 100_000}, batch=True) == Decimal("0.75")
        # The entry gives no cache prices: cache tokens make it unknown, not the shipped price.
        assert call_cost(SONNET, USAGE) is None
        # Models the operator's file does not name keep the shipped prices.
        assert call_cost("claude-haiku-4-5", {"output_tokens": 1_000_000}) == 5


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[models."m"]\ninput = "lots"\n', 'models."m".input must be a number'),
        ('[models."m"]\ninput = -1\n', "must be a number of 0 or more"),
        ('[models."m"]\ninptu = 1\n', "unknown field(s) inptu"),
        ('[models."m"]\nbatch_discount = 2\n', "batch_discount is a fraction, at most 1"),
        ("[models\n", "is unreadable"),
    ],
)
def test_a_bad_price_table_is_refused_naming_the_file_and_the_field(
    tmp_path: Path, text: str, complaint: str
) -> None:
    prices = tmp_path / "bad.toml"
    prices.write_text(text)
    with override_settings(PRICES_FILE=str(prices)), pytest.raises(ImproperlyConfigured) as bad:
        price_for(SONNET)
    assert str(prices) in str(bad.value)
    assert complaint in str(bad.value)


@pytest.mark.django_db(transaction=True)
def test_each_proxied_call_carries_its_cost_and_an_unknown_model_shows_unknown(
    proxied: Proxied, fake_anthropic: FakeAnthropic, admin_client: Client, admin_api: Client
) -> None:
    client = anthropic.Anthropic(base_url=proxied.base_url, api_key=proxied.token, max_retries=0)
    fake_anthropic.answer_next(
        200,
        {
            "id": "msg_priced",
            "type": "message",
            "role": "assistant",
            "model": SONNET,
            "content": [{"type": "text", "text": "Priced."}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 1_200,
                "output_tokens": 800,
                "cache_read_input_tokens": 10_000,
                "cache_creation_input_tokens": 3_000,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 2_000,
                    "ephemeral_1h_input_tokens": 1_000,
                },
            },
        },
    )
    hello = [{"role": "user", "content": "hi"}]
    client.messages.create(model=SONNET, max_tokens=16, messages=hello)  # type: ignore[arg-type]
    with client.messages.stream(
        model="claude-unpriced-1",
        max_tokens=16,
        messages=hello,  # type: ignore[arg-type]
    ) as stream:
        stream.until_done()
    audit_drained()

    priced, unpriced = AuditEvent.objects.filter(action="proxy.request").order_by("id")
    assert (priced.model, priced.cost_usd) == (SONNET, SONNET_COST)
    assert (unpriced.model, unpriced.input_tokens, unpriced.cost_usd) == (
        "claude-unpriced-1",
        12,
        None,
    )
    listed = admin_client.get("/admin/audit/auditevent/").content.decode()
    assert "0.0321" in listed
    assert "unknown" in listed
    api = admin_api.get("/v1/admin/audit/?action=proxy.request").json()["results"]
    assert {event["cost_usd"] for event in api} == {"0.032100", None}
