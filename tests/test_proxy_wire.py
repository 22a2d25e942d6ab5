"""The proxy on the wire: headers, errors, streaming, timeouts and refusals, byte for byte."""

from __future__ import annotations

import gzip
import json
import time
from datetime import timedelta
from typing import Any

import anthropic
import httpx
import pytest
from django.utils import timezone

from audit.models import AuditEvent
from broker.models import Backend, Token
from broker.services.tokens import token_revoke
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic, error
from tests.proxy_cast import Proxied, audit_drained
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "claude-haiku-4-5"
MESSAGE = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": "Hi"}]}
CLAUDE_CODE_BETAS = (
    "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14,"
    "fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27"
)


def post(proxied: Proxied, path: str = "/v1/messages", **kwargs: Any) -> httpx.Response:
    headers = {"x-api-key": proxied.token, **kwargs.pop("headers", {})}
    return httpx.post(f"{proxied.base_url}{path}", headers=headers, timeout=30, **kwargs)


def test_claude_codes_request_shape_arrives_unchanged(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    response = post(
        proxied,
        "/v1/messages?beta=true",
        json=MESSAGE,
        headers={
            "anthropic-version": "2023-06-01",
            "anthropic-beta": CLAUDE_CODE_BETAS,
            "x-app": "cli",
            "user-agent": "claude-cli/2.0.0 (external, cli)",
            "anthropic-dangerous-direct-browser-access": "true",
            "connection": "keep-alive",
        },
    )
    assert response.status_code == 200
    seen = fake_anthropic.requests[-1]
    assert (seen.method, seen.path, seen.query) == ("POST", "/v1/messages", "beta=true")
    assert seen.headers["anthropic-beta"] == CLAUDE_CODE_BETAS
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["x-app"] == "cli"
    assert seen.headers["user-agent"] == "claude-cli/2.0.0 (external, cli)"
    assert seen.headers["x-api-key"] == proxied.key
    assert json.loads(seen.body) == MESSAGE
    assert response.headers["request-id"].startswith("req_")


def test_a_missing_anthropic_version_gets_the_default_and_a_given_one_is_kept(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    post(proxied, json=MESSAGE)
    post(proxied, json=MESSAGE, headers={"anthropic-version": "2026-10-21"})
    versions = [r.headers["anthropic-version"] for r in fake_anthropic.requests]
    assert versions == ["2023-06-01", "2026-10-21"]


def test_an_oauth_backend_sends_bearer_with_the_beta_flag_added_once(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    from broker.services.backends import backend_rotate
    from tests.keys import oauth_token

    token = oauth_token()
    fake_anthropic.valid_keys.add(token)
    backend_rotate(backend=Backend.objects.get(), secret=token)
    for beta in [None, "files-api-2025-04-14", "oauth-2025-04-20,files-api-2025-04-14"]:
        extra = {"anthropic-beta": beta} if beta else {}
        assert post(proxied, json=MESSAGE, headers=extra).status_code == 200
    seen = fake_anthropic.requests
    assert all(r.headers["authorization"] == f"Bearer {token}" for r in seen)
    assert all("x-api-key" not in r.headers for r in seen)
    assert [r.headers["anthropic-beta"] for r in seen] == [
        "oauth-2025-04-20",
        "files-api-2025-04-14,oauth-2025-04-20",
        "oauth-2025-04-20,files-api-2025-04-14",
    ]


@pytest.mark.parametrize(
    ("status", "error_type", "headers", "exception"),
    [
        (400, "invalid_request_error", {}, anthropic.BadRequestError),
        (401, "authentication_error", {}, anthropic.AuthenticationError),
        (429, "rate_limit_error", {"retry_after": "7", "x_should_retry": "false",
         "anthropic_ratelimit_requests_remaining": "0"}, anthropic.RateLimitError),
        (500, "api_error", {"x_should_retry": "false"}, anthropic.InternalServerError),
        (529, "overloaded_error", {"x_should_retry": "false"}, anthropic.APIStatusError),
    ],
)  # fmt: skip
def test_upstream_errors_reach_the_sdk_unchanged(
    proxied: Proxied,
    fake_anthropic: FakeAnthropic,
    status: int,
    error_type: str,
    headers: dict[str, str],
    exception: type[Exception],
) -> None:
    body = error(error_type, f"upstream says {status}")
    fake_anthropic.answer_next(status, body, **headers)
    raw = post(proxied, json=MESSAGE)
    assert raw.status_code == status
    assert raw.json() == body
    for name, value in headers.items():
        assert raw.headers[name.replace("_", "-")] == value

    fake_anthropic.answer_next(status, body, **headers)
    client = anthropic.Anthropic(base_url=proxied.base_url, api_key=proxied.token, max_retries=0)
    with pytest.raises(exception) as raised:
        client.messages.create(**MESSAGE)
    assert getattr(raised.value, "status_code", None) == status
    assert f"upstream says {status}" in str(raised.value)


def test_streaming_is_unbuffered(proxied: Proxied, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.stream_deltas = 6
    fake_anthropic.stream_gap_seconds = 0.3
    arrivals: list[float] = []
    client = anthropic.Anthropic(base_url=proxied.base_url, api_key=proxied.token)
    with client.messages.stream(**MESSAGE) as stream:
        for _ in stream.text_stream:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] > 1.0


def test_sse_frames_come_through_byte_for_byte_with_no_buffering_header(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    from tests.fake_anthropic import sse_frames

    with httpx.stream(
        "POST",
        f"{proxied.base_url}/v1/messages",
        json={**MESSAGE, "stream": True},
        headers={"x-api-key": proxied.token},
    ) as response:
        body = b"".join(response.iter_raw())
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["content-type"].startswith("text/event-stream")
    expected = b"".join(sse_frames({**MESSAGE, "stream": True}, 5))
    # Ids differ per message; the frames' shape and order must not.
    assert body.count(b"\n\n") == expected.count(b"\n\n")
    assert body.split(b"\n")[0] == b"event: message_start"


def test_a_gzipped_answer_stays_gzipped_and_is_still_metered(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.gzip_json = True
    with httpx.stream(
        "POST",
        f"{proxied.base_url}/v1/messages",
        json=MESSAGE,
        headers={"x-api-key": proxied.token, "accept-encoding": "gzip"},
    ) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(raw)
    assert json.loads(gzip.decompress(raw))["usage"]["input_tokens"] == 12
    audit_drained()
    event = AuditEvent.objects.get(action="proxy.request")
    assert (event.input_tokens, event.output_tokens) == (12, 6)


def test_an_upstream_that_is_down_gives_502(proxied: Proxied) -> None:
    Backend.objects.update(base_url=f"http://127.0.0.1:{free_port()}")
    _changed()
    response = post(proxied, json=MESSAGE)
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert "unreachable" in response.json()["error"]["message"]


def test_an_upstream_that_hangs_gives_504(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PROXY_IDLE_TIMEOUT_SECONDS = 1
    fake_anthropic.hang_seconds = 3
    response = post(proxied, json=MESSAGE)
    assert response.status_code == 504
    assert "timed out" in response.json()["error"]["message"]


def test_a_stream_cut_midway_breaks_the_clients_stream_and_is_audited(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.cut_stream_after = 5
    client = anthropic.Anthropic(base_url=proxied.base_url, api_key=proxied.token, max_retries=0)
    started = time.monotonic()

    def read_it_all() -> None:
        with client.messages.stream(**MESSAGE) as stream:
            for _ in stream.text_stream:
                pass

    # The SDK's transport (httpx or its fork) reports the broken body as a protocol error.
    with pytest.raises(Exception, match=r"peer closed connection|incomplete"):
        read_it_all()
    assert time.monotonic() - started < 10  # a break, not a hang
    audit_drained()
    event = AuditEvent.objects.get(action="proxy.request")
    assert event.outcome == "upstream_broke"
    assert "cut the stream" in event.message


def _changed() -> None:
    from broker.services.access import access_changed

    access_changed()  # outside a transaction it is announced at once: the next call sees it


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "send a crd_ token as x-api-key or Authorization: Bearer"),
        ({"x-api-key": "crd_nope"}, "invalid token"),
        ({"authorization": "Bearer garbage"}, "invalid token"),
        (
            {"authorization": "Basic Ym9iOmJvYg=="},
            "send a crd_ token as x-api-key or Authorization: Bearer",
        ),
    ],
)
def test_bad_credentials_get_anthropics_401_and_nothing_goes_upstream(
    proxied: Proxied, fake_anthropic: FakeAnthropic, headers: dict[str, str], message: str
) -> None:
    response = httpx.post(f"{proxied.base_url}/v1/messages", json=MESSAGE, headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": message},
    }
    assert fake_anthropic.requests == []


def test_expired_and_revoked_tokens_are_refused_with_the_reason(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    assert post(proxied, json=MESSAGE).status_code == 200  # now cached
    Token.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    _changed()
    expired = post(proxied, json=MESSAGE)
    assert (expired.status_code, expired.json()["error"]["message"]) == (401, "token expired")
    Token.objects.update(expires_at=timezone.now() + timedelta(minutes=5))
    token_revoke(token=Token.objects.get())
    revoked = post(proxied, json=MESSAGE)
    assert (revoked.status_code, revoked.json()["error"]["message"]) == (401, "token revoked")
    assert len(fake_anthropic.requests) == 1


def test_an_expired_token_is_refused_without_any_change_signal(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    Token.objects.update(expires_at=timezone.now() + timedelta(seconds=1))
    _changed()
    assert post(proxied, json=MESSAGE).status_code == 200
    time.sleep(1.2)  # waiting out the token's last second is what is tested
    assert post(proxied, json=MESSAGE).json()["error"]["message"] == "token expired"


def test_a_token_for_one_backend_does_not_open_another(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    from broker.services.backends import backend_add
    from tests.keys import api_key

    backend_add(name="staging", secret=api_key(), base_url=fake_anthropic.url)
    response = httpx.post(
        f"{proxied.base_url.replace('/anthropic', '/staging')}/v1/messages",
        json=MESSAGE,
        headers={"x-api-key": proxied.token},
    )
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert fake_anthropic.requests == []
    audit_drained()
    refused = AuditEvent.objects.get(backend="staging", action="policy.denied")
    assert (refused.action, refused.agent, refused.token_id) == (
        "policy.denied",
        "bob",
        proxied.token_id,
    )


def test_an_over_limit_body_gets_413(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PROXY_MAX_BODY_BYTES = 10_000
    big = {**MESSAGE, "messages": [{"role": "user", "content": "x" * 20_000}]}
    response = post(proxied, json=big)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    assert fake_anthropic.requests == []
    chunked = post(proxied, content=iter([b"x" * 6000, b"y" * 6000]))
    assert chunked.status_code == 413


def test_a_disabled_backend_is_refused(proxied: Proxied, fake_anthropic: FakeAnthropic) -> None:
    from broker.services.backends import backend_update

    backend_update(backend=Backend.objects.get(), enabled=False)
    response = post(proxied, json=MESSAGE)
    assert response.status_code == 403
    assert "disabled" in response.json()["error"]["message"]
    assert fake_anthropic.requests == []


def test_binary_and_multipart_bodies_pass_through(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    blob = bytes(range(256)) * 40
    post(proxied, "/v1/files", files={"file": ("blob.bin", blob, "application/octet-stream")})
    seen = fake_anthropic.requests[-1]
    assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert blob in seen.body
    assert int(seen.headers["content-length"]) == len(seen.body)


def test_a_token_minted_before_rotation_keeps_working_with_the_new_key(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    from broker.services.backends import backend_rotate
    from tests.keys import api_key

    assert post(proxied, json=MESSAGE).status_code == 200  # the old key is now cached
    new_key = api_key(tail="N3wK")
    fake_anthropic.valid_keys = {new_key}
    backend_rotate(backend=Backend.objects.get(), secret=new_key)

    assert post(proxied, json=MESSAGE).status_code == 200
    assert fake_anthropic.requests[-1].headers["x-api-key"] == new_key
    assert fake_anthropic.requests[0].headers["x-api-key"] == proxied.key


def test_last_used_is_written_once_a_minute_at_most(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    assert Token.objects.get().last_used_at is None
    post(proxied, json=MESSAGE)
    first = wait_until(
        lambda: Token.objects.get().last_used_at, timeout=5, what="last_used_at to be written"
    )
    for _ in range(3):
        post(proxied, json=MESSAGE)
    time.sleep(0.3)  # nothing to wait on for a write that must not come: give it the time
    assert Token.objects.get().last_used_at == first
