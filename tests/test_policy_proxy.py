"""Policy at the proxy: bob's grant on anthropic says what he may call and how much, and the
fake upstream never hears of what it refuses."""

from __future__ import annotations

import gzip
import time
from typing import Any

import anthropic
import httpx
import pytest

from audit.models import AuditEvent
from broker.models import Grant
from broker.selectors.policy import policy_left
from broker.services.policy import grant_policy, grant_update
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HAIKU = "claude-haiku-4-5"
OPUS = "claude-opus-4-1"
HELLO = [{"role": "user", "content": "Hello"}]


def bobs_grant() -> Grant:
    return Grant.objects.select_related("agent", "backend").get(agent__name="bob")


def set_policy(**changes: Any) -> Grant:
    return grant_update(grant=bobs_grant(), policy=changes)


def sdk(proxied: Proxied, base_url: str | None = None) -> anthropic.Anthropic:
    # No retries: the test wants to see each refusal, not the SDK waiting it out.
    return anthropic.Anthropic(
        base_url=base_url or proxied.base_url, api_key=proxied.token, max_retries=0
    )


def post(proxied: Proxied, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"x-api-key": proxied.token, **kwargs.pop("headers", {})}
    return httpx.post(f"{proxied.base_url}{path}", headers=headers, timeout=30, **kwargs)


def denied_events() -> list[AuditEvent]:
    audit_drained()
    return list(AuditEvent.objects.filter(action="policy.denied").order_by("id"))


def used(kind: str) -> int | None:
    entry = policy_left(grant_policy(bobs_grant()))[kind]
    return None if entry is None else entry["used"]


def wait_until_counted(kind: str, expected: int) -> None:
    """Usage is counted just after a call ends, off the response path: wait for it."""
    wait_until(
        lambda: used(kind) == expected,
        timeout=5,
        what=lambda: f"{kind} usage of {expected} (it is {used(kind)})",
    )


def test_a_model_outside_the_allow_list_never_reaches_upstream(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(models=["claude-haiku-*", "claude-sonnet-4-*"])
    client = sdk(proxied)
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        client.messages.create(model=OPUS, max_tokens=8, messages=HELLO)
    assert fake_anthropic.requests == []
    assert "policy models" in refused.value.message
    assert "claude-opus-4-1" in refused.value.message

    assert client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO).usage
    assert [r.path for r in fake_anthropic.requests] == ["/v1/messages"]
    (event,) = denied_events()
    assert (event.status, event.policy_result, event.model) == (403, "denied", OPUS)
    assert event.detail["policy_rule"] == "models"
    assert "policy models" in event.policy_reason


def test_a_path_outside_the_path_list_never_reaches_upstream(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(paths=["/v1/messages"])
    client = sdk(proxied)
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        client.models.list()
    assert fake_anthropic.requests == []
    assert "policy paths: path /v1/models is not allowed" in refused.value.message
    # A path is matched whole: /v1/messages is not what lies below it.
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.count_tokens(model=HAIKU, messages=HELLO)
    one: Any = [{"custom_id": "a", "params": {"model": HAIKU, "max_tokens": 8, "messages": HELLO}}]
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.batches.create(requests=one)
    assert fake_anthropic.requests == []
    assert client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO).usage
    assert [r.path for r in fake_anthropic.requests] == ["/v1/messages"]
    events = denied_events()
    assert [(e.path, e.detail["policy_rule"]) for e in events] == [
        ("/v1/models", "paths"),
        ("/v1/messages/count_tokens", "paths"),
        ("/v1/messages/batches", "paths"),
    ]

    for below in ("/v1/messages/**", "/v1/messages**"):
        set_policy(paths=[below])
        fake_anthropic.requests.clear()
        client.messages.count_tokens(model=HAIKU, messages=HELLO)
        client.messages.batches.create(requests=one)
        assert [r.path for r in fake_anthropic.requests] == [
            "/v1/messages/count_tokens",
            "/v1/messages/batches",
        ]


def test_a_batch_cannot_smuggle_a_model_or_a_bigger_max_tokens(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(models=["claude-haiku-*"], max_tokens=100)
    client = sdk(proxied)
    fine = {"model": HAIKU, "max_tokens": 8, "messages": HELLO}
    for bad in ({"model": OPUS}, {"max_tokens": 4096}):
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.batches.create(
                requests=[
                    {"custom_id": "fine", "params": fine},
                    {"custom_id": "bad", "params": {**fine, **bad}},
                ]
            )
    assert fake_anthropic.requests == []


def test_max_tokens_over_the_cap_is_refused_naming_the_rule(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(max_tokens=1024)
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        sdk(proxied).messages.create(model=HAIKU, max_tokens=4096, messages=HELLO)
    assert "policy max_tokens: max_tokens 4096 is over the cap of 1024" in refused.value.message
    response = post(proxied, "/v1/messages", json={"model": HAIKU, "max_tokens": "4096"})
    assert response.status_code == 403
    assert sdk(proxied).messages.create(model=HAIKU, max_tokens=1024, messages=HELLO)
    assert len(fake_anthropic.requests) == 1


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        # Two readers of one body must never see two models: keybroker the first or last,
        # the upstream the other.
        (b'{"model": "claude-haiku-4-5", "model": "claude-opus-4-1", "max_tokens": 8}', {}),
        (b'{"model": "claude-haiku-4-5", "max_tokens": 8,}', {}),  # JSON only lenient parsers read
        (gzip.compress(b'{"model": "claude-opus-4-1"}'), {"content-encoding": "gzip"}),
    ],
)
def test_a_body_keybroker_cannot_read_as_the_upstream_would_is_refused(
    proxied: Proxied, fake_anthropic: FakeAnthropic, body: bytes, headers: dict[str, str]
) -> None:
    set_policy(models=["claude-haiku-*"])
    response = post(
        proxied,
        "/v1/messages",
        content=body,
        headers={"content-type": "application/json", **headers},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["message"].startswith("policy models: ")
    assert fake_anthropic.requests == []


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", ""])
def test_a_model_is_checked_on_any_path_whatever_the_content_type(
    proxied: Proxied, fake_anthropic: FakeAnthropic, content_type: str
) -> None:
    # The legacy completions API names its model too, and a BOM is no way around the check.
    set_policy(models=["claude-haiku-*"])
    body = b'\xef\xbb\xbf{"model": "claude-opus-4-1", "prompt": "Hi", "max_tokens_to_sample": 8}'
    response = post(proxied, "/v1/complete", content=body, headers={"content-type": content_type})
    assert response.status_code == 403
    assert response.json()["error"]["message"].startswith("policy models: model 'claude-opus")
    assert fake_anthropic.requests == []


def test_the_fourth_request_in_a_window_gets_429_and_works_again_after_it(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.POLICY_WINDOW_SECONDS = 2  # "a minute", shortened so the test can see one pass
    set_policy(rpm=3)
    client = sdk(proxied)
    for _ in range(3):
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    retry_after = int(limited.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 2
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "policy rpm: 3 requests per 2s used up" in limited.value.message
    assert len(fake_anthropic.requests) == 3

    time.sleep(retry_after)  # waiting out the window the 429 named is what is tested
    client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    assert len(fake_anthropic.requests) == 4
    (event,) = denied_events()
    assert (event.status, event.detail["policy_rule"]) == (429, "rpm")


def test_streamed_calls_that_pass_the_daily_budget_block_the_next_one(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=60)
    client = sdk(proxied)
    seen = 0  # every token the SDK was told of, as keybroker counts them
    for _ in range(3):
        with client.messages.stream(model=HAIKU, max_tokens=64, messages=HELLO) as stream:
            usage = stream.get_final_message().usage
        seen += (
            usage.input_tokens
            + usage.output_tokens
            + (usage.cache_read_input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0)
        )
        wait_until_counted("daily_tokens", seen)
        assert used("daily_tokens") == seen
        if seen >= 60:
            break
    assert seen == 75  # three streams of 12 in, 3 from the cache, 10 out
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    assert "policy daily_tokens: 75 of the daily budget of 60 tokens used" in (
        limited.value.message
    )
    # Retrying in seconds cannot help: the SDKs are told not to.
    assert limited.value.response.headers["x-should-retry"] == "false"
    assert int(limited.value.response.headers["retry-after"]) <= 86_400
    assert len(fake_anthropic.requests) == 3


def test_tokens_per_minute_count_the_usage_of_each_answer(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    # A long fixed window, so the two calls cannot fall on either side of its edge.
    settings.POLICY_WINDOW_SECONDS = 3600
    set_policy(tpm=20)
    client = sdk(proxied)
    client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)  # 12 + 3 + 6 = 21
    wait_until_counted("tpm", 21)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    assert "policy tpm: 21 of 20 tokens per 3600s used" in limited.value.message
    assert "x-should-retry" not in limited.value.response.headers
    assert len(fake_anthropic.requests) == 1


def test_two_processes_share_one_limit(
    proxied: Proxied,
    fake_anthropic: FakeAnthropic,
    second_process: str,
) -> None:
    set_policy(rpm=3)
    here = sdk(proxied)
    there = sdk(proxied, base_url=f"{second_process}/v1/proxy/anthropic")
    here.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    there.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    here.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    for client in (there, here):
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    assert len(fake_anthropic.requests) == 3


def test_with_redis_down_limits_fail_closed_by_default(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    set_policy(rpm=100)
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    response = post(proxied, "/v1/messages", json={"model": HAIKU, "max_tokens": 8})
    assert response.status_code == 503
    assert response.json()["error"]["message"].startswith("policy unavailable: ")
    assert fake_anthropic.requests == []
    (event,) = denied_events()
    assert (event.status, event.detail["policy_rule"]) == (503, "unavailable")


def test_with_redis_down_and_fail_open_set_calls_go_through(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    set_policy(rpm=100)
    settings.POLICY_FAIL_OPEN = True
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = post(proxied, "/v1/messages", json={"model": HAIKU, "max_tokens": 8})
    assert response.status_code == 200
    assert len(fake_anthropic.requests) == 1


def test_a_grant_without_rates_or_budgets_never_asks_redis(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    set_policy(models=["claude-haiku-*"], max_tokens=64)
    # Fail-closed and Redis gone: only a call that asked Redis could be refused.
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = post(proxied, "/v1/messages", json={"model": HAIKU, "max_tokens": 8})
    assert response.status_code == 200
