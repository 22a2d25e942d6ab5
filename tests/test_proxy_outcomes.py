"""When keybroker answers in the upstream's place, the audit says what happened: a request
wrong as sent, a call keybroker would not take, or an upstream it could not reach."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from audit.models import AuditEvent
from broker.models import Backend
from broker.services.access import access_changed
from proxy.access import AccessDenied
from proxy.errors import BadRequest, ProxyError, UpstreamFailed
from proxy.policy import PolicyDenied
from proxy.providers import ANTHROPIC, OPENAI
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 8}


@pytest.mark.parametrize(
    ("error", "outcome", "action", "denied"),
    [
        (
            AccessDenied(401, "authentication_error", "token expired"),
            "denied",
            "proxy.request",
            True,
        ),
        (AccessDenied(403, "permission_error", "no grant"), "denied", "policy.denied", True),
        (
            PolicyDenied(400, "invalid_request_error", rule="models", message="not JSON"),
            "denied",
            "policy.denied",
            True,
        ),
        (
            PolicyDenied(503, "api_error", rule="unavailable", message="no Redis"),
            "denied",
            "policy.denied",
            True,
        ),
        (BadRequest(413, "request_too_large", "too big"), "denied", "proxy.request", True),
        (UpstreamFailed("unreachable"), "upstream_unreachable", "proxy.request", False),
        (UpstreamFailed("slow", timed_out=True), "upstream_timeout", "proxy.request", False),
    ],
)
def test_the_class_of_an_answer_says_how_its_call_is_audited(
    error: ProxyError, outcome: str, action: str, denied: bool
) -> None:
    assert (error.outcome, error.action, error.denied) == (outcome, action, denied)
    assert json.loads(error.body_in(ANTHROPIC)) == {
        "type": "error",
        "error": {"type": error.error_type, "message": error.message},
    }
    assert json.loads(error.body_in(OPENAI)) == {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": None,
            "code": {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(error.status),
        }
    }


def the_event() -> AuditEvent:
    audit_drained()
    (event,) = AuditEvent.objects.filter(action__in=["proxy.request", "policy.denied"])
    return event


def test_a_body_over_the_limit_is_a_bad_request_denied_before_it_goes_upstream(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PROXY_MAX_BODY_BYTES = 1024
    response = httpx.post(
        f"{proxied.base_url}/v1/messages",
        headers={"x-api-key": proxied.token},
        content=b"x" * 2048,
    )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    event = the_event()
    assert (event.action, event.status, event.outcome) == ("proxy.request", 413, "denied")
    assert (event.policy_result, event.policy_reason) == (
        "denied",
        "request body is over 1024 bytes",
    )
    assert (event.agent, event.token_id) == ("bob", proxied.token_id)
    assert fake_anthropic.requests == []


def test_a_process_holding_too_many_bodies_refuses_the_call_and_blames_no_upstream(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PROXY_BUFFERED_BODY_BYTES = 100
    messages = [{"role": "user", "content": "x" * 500}]
    response = httpx.post(
        f"{proxied.base_url}/v1/messages",
        headers={"x-api-key": proxied.token},
        json={**MESSAGE, "messages": messages},
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "overloaded_error"
    event = the_event()
    assert (event.action, event.status, event.outcome) == ("proxy.request", 503, "denied")
    assert event.policy_result == "denied"
    assert event.policy_reason.startswith("keybroker holds too many request bodies")
    assert fake_anthropic.requests == []


def test_an_upstream_it_cannot_reach_is_an_allowed_call_that_failed(proxied: Proxied) -> None:
    # Nothing listens on the discard port: the connection is refused.
    Backend.objects.filter(pk=proxied.backend.pk).update(base_url="http://127.0.0.1:9")
    access_changed()
    response = httpx.get(f"{proxied.base_url}/v1/models", headers={"x-api-key": proxied.token})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    event = the_event()
    assert (event.action, event.status) == ("proxy.request", 502)
    assert (event.outcome, event.policy_result, event.policy_reason) == (
        "upstream_unreachable",
        "allowed",
        "",
    )
    assert "unreachable" in event.message
