"""The official anthropic SDK, unchanged, through the proxy to the fake upstream."""

from __future__ import annotations

import anthropic
import pytest

from audit.models import AuditEvent
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "claude-haiku-4-5"
HELLO = [{"role": "user", "content": "Hello"}]


def wait_for_events(action: str, count: int = 1, timeout: float = 5.0) -> list[AuditEvent]:
    def written() -> list[AuditEvent]:
        events = list(AuditEvent.objects.filter(action=action).order_by("id"))
        return events if len(events) >= count else []

    return wait_until(written, timeout=timeout, what=f"{count} {action} event(s)")


def assert_only_the_real_key_went_upstream(fake: FakeAnthropic, proxied: Proxied) -> None:
    assert fake.requests, "nothing reached the upstream"
    for seen in fake.requests:
        assert seen.headers.get("x-api-key") == proxied.key
        assert "authorization" not in seen.headers
        assert proxied.token not in str(seen.headers)


@pytest.mark.parametrize("credential", ["api_key", "auth_token"])
def test_the_sync_sdk_creates_streams_counts_and_lists(
    proxied: Proxied, fake_anthropic: FakeAnthropic, credential: str
) -> None:
    client = anthropic.Anthropic(base_url=proxied.base_url, **{credential: proxied.token})
    reply = client.messages.create(model=MODEL, max_tokens=64, messages=HELLO, system="Be brief")
    assert reply.content[0].text == "Hello from the fake."
    assert reply.usage.input_tokens == 12

    with client.messages.stream(model=MODEL, max_tokens=64, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "word0 word1 word2 word3 word4 "
    assert final.usage.output_tokens == 10

    assert client.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens == 42
    assert [m.id for m in client.models.list()] == [
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5-20251001",
    ]
    assert_only_the_real_key_went_upstream(fake_anthropic, proxied)

    events = wait_for_events("proxy.request", 4)
    assert len(events) == 4
    created, streamed = events[0], events[1]
    assert (created.model, created.system_prompt, created.streamed) == (MODEL, True, False)
    assert (created.input_tokens, created.output_tokens) == (12, 6)
    assert created.cache_read_tokens == 3
    assert created.stop_reason == "end_turn"
    assert (streamed.streamed, streamed.output_tokens, streamed.system_prompt) == (True, 10, False)
    assert events[0].agent == "bob"
    assert all(e.status == 200 for e in events)
    assert all(proxied.token not in str(e.detail) for e in events)


async def test_the_async_sdk_creates_and_streams(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    client = anthropic.AsyncAnthropic(base_url=proxied.base_url, api_key=proxied.token)
    reply = await client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert reply.stop_reason == "end_turn"
    async with client.messages.stream(model=MODEL, max_tokens=64, messages=HELLO) as stream:
        words = [text async for text in stream.text_stream]
    assert len(words) == 5
    await client.close()
    assert_only_the_real_key_went_upstream(fake_anthropic, proxied)


def test_a_batch_round_trip_goes_through_the_proxy(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    client = anthropic.Anthropic(base_url=proxied.base_url, api_key=proxied.token)
    batch = client.messages.batches.create(
        requests=[
            {"custom_id": "one", "params": {"model": MODEL, "max_tokens": 8, "messages": HELLO}},
            {"custom_id": "two", "params": {"model": MODEL, "max_tokens": 8, "messages": HELLO}},
        ]
    )
    assert batch.results_url is not None
    assert batch.results_url.startswith(proxied.base_url + "/v1/messages/batches/")
    assert client.messages.batches.retrieve(batch.id).results_url == batch.results_url
    results = list(client.messages.batches.results(batch.id))
    assert [r.custom_id for r in results] == ["one", "two"]
    assert_only_the_real_key_went_upstream(fake_anthropic, proxied)
