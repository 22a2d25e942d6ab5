"""What a proxied call leaves in the trail: the right metadata in columns, and no content."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from audit.models import AuditEvent
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "claude-haiku-4-5"
PROMPT = "Describe the lighthouse at Hook Head, please (prompt-7f3a)"
SYSTEM = "You are a terse keeper of lighthouses (system-91c2)"


def proxied_events() -> list[AuditEvent]:
    audit_drained()
    return list(AuditEvent.objects.filter(action="proxy.request").order_by("created_at", "id"))


def test_streamed_and_plain_calls_carry_model_tokens_stop_reason_status_and_system_flag(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    client = anthropic.Anthropic(base_url=proxied.base_url, api_key=proxied.token)
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.messages.create(model=MODEL, max_tokens=64, messages=messages, system=SYSTEM)
    with client.messages.stream(model=MODEL, max_tokens=64, messages=messages) as stream:
        completion = "".join(stream.text_stream)
        final = stream.get_final_message()

    plain, streamed = proxied_events()
    assert (plain.model, plain.system_prompt, plain.streamed) == (MODEL, True, False)
    assert (streamed.model, streamed.system_prompt, streamed.streamed) == (MODEL, False, True)
    for event, usage, stop_reason in [
        (plain, reply.usage, reply.stop_reason),
        (streamed, final.usage, final.stop_reason),
    ]:
        # Exactly what the SDK reports in usage, streamed (message_delta wins) or not.
        assert event.input_tokens == usage.input_tokens
        assert event.output_tokens == usage.output_tokens
        assert event.cache_read_tokens == usage.cache_read_input_tokens
        assert event.cache_write_tokens == usage.cache_creation_input_tokens
        assert event.stop_reason == stop_reason
        assert (event.status, event.outcome, event.policy_result) == (200, "ok", "allowed")
        assert (event.method, event.path) == ("POST", "/v1/messages")
        assert (event.agent, event.actor_type, event.backend) == ("bob", "agent", "anthropic")
        assert (event.token_id, event.token_prefix) == (proxied.token_id, proxied.token[:12])
        assert event.client_address == "127.0.0.1"
        assert event.ttfb_ms is not None
        assert event.duration_ms is not None
        assert 0 <= event.ttfb_ms <= event.duration_ms
    assert (plain.output_tokens, streamed.output_tokens) == (6, 10)  # not one copied twice
    assert plain.request_id == reply._request_id
    assert streamed.request_id.startswith("req_")

    # No column of any event holds the prompt, the system prompt, the answer or a secret.
    rows = json.dumps(list(AuditEvent.objects.values()), default=str)
    for forbidden in [
        PROMPT, "prompt-7f3a", SYSTEM, "system-91c2", reply.content[0].text, completion,
        "word0", proxied.token, proxied.token[12:], proxied.key, proxied.key[-20:],
    ]:  # fmt: skip
        assert forbidden not in rows, forbidden
    assert fake_anthropic.requests[0].body.decode().count("prompt-7f3a") == 1  # it did pass


def test_a_token_for_another_backend_is_a_policy_denial_with_its_reason(
    proxied: Proxied, fake_anthropic: FakeAnthropic, live_url: str
) -> None:
    response = httpx.get(
        f"{live_url}/v1/proxy/staging/v1/models", headers={"x-api-key": proxied.token}
    )
    assert response.status_code == 403
    audit_drained()
    event = AuditEvent.objects.get(action__in=["proxy.request", "policy.denied"])
    assert (event.action, event.status, event.backend) == ("policy.denied", 403, "staging")
    assert (event.outcome, event.policy_result) == ("denied", "denied")
    assert event.policy_reason.startswith("this token is for backend anthropic, not staging; ")
    assert fake_anthropic.requests == []


def test_an_unknown_token_is_a_refused_proxied_call(proxied: Proxied) -> None:
    response = httpx.get(
        f"{proxied.base_url}/v1/models", headers={"x-api-key": proxied.token[:-3] + "xyz"}
    )
    assert response.status_code == 401
    (event,) = proxied_events()
    assert (event.status, event.outcome, event.policy_result) == (401, "denied", "denied")
    assert (event.policy_reason, event.agent, event.token_id) == ("invalid token", "", "")


def test_an_upstream_error_is_recorded_as_the_upstream_said_it(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.answer_next(
        529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    client = anthropic.Anthropic(base_url=proxied.base_url, api_key=proxied.token, max_retries=0)
    with pytest.raises(anthropic.APIStatusError):
        client.messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    (event,) = proxied_events()
    assert (event.status, event.outcome, event.policy_result) == (529, "upstream_error", "allowed")
    # The key that served is named by its fingerprint (issue 15), never the key.
    assert event.detail == {
        "error_type": "overloaded_error",
        "key_fingerprint": proxied.backend.secret_fingerprint,
    }
