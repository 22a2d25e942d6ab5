"""What the proxy must never do: reach another host, hold a stream nobody reads, or trust a
revoked token in another process."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from audit.models import AuditEvent
from broker.models import Token
from broker.services.agents import agent_enroll
from broker.services.tokens import token_revoke
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic, serve_in_thread
from tests.proxy_cast import Proxied, audit_drained
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def canary() -> Iterator[FakeAnthropic]:
    """A second server that no probe may ever reach."""
    fake = FakeAnthropic()
    port = free_port()
    server = serve_in_thread(fake, port)
    fake.url = f"127.0.0.1:{port}"
    yield fake
    server.should_exit = True


def raw_request(url: str, target: str, token: str) -> int:
    """Send the request-target exactly as written (no client-side normalisation)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nx-api-key: {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


PROBES = [
    "//{canary}/v1/models",
    "/{canary}/v1/models",
    "/@{canary}/v1/models",
    "/http://{canary}/v1/models",
    "/%2F%2F{canary}/v1/models",
    "/v1/..%2F..%2F{canary}/v1/models",
    "/v1/../../{canary}/v1/models",
    "/%2e%2e/%2e%2e/v1/models",
    "/v1/./models",
    "/\\\\{canary}/v1/models",
    "/v1/models%00@{canary}",
    "/v1/models?x=@{canary}",
    ":{port}/v1/models",
    "@{canary}/v1/models",
]


@pytest.mark.parametrize("probe", PROBES)
def test_no_path_leaves_the_backends_host(
    proxied: Proxied, fake_anthropic: FakeAnthropic, canary: FakeAnthropic, probe: str
) -> None:
    port = canary.url.split(":")[1]
    target = "/v1/proxy/anthropic" + probe.format(canary=canary.url, port=port)
    status = raw_request(proxied.base_url.split("/v1/")[0], target, proxied.token)
    assert canary.requests == []
    if status not in {400, 404}:
        # Allowed only if it stayed on the backend's own host, on a path under it.
        assert fake_anthropic.requests, f"{target} answered {status} from nowhere"
        assert fake_anthropic.requests[-1].headers["host"] == fake_anthropic.url.split("//")[1]


def test_a_client_that_hangs_up_closes_the_upstream_stream(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.stream_deltas = 100
    fake_anthropic.stream_gap_seconds = 0.2
    body = {"model": "m", "max_tokens": 8, "stream": True, "messages": []}
    with httpx.stream(
        "POST",
        f"{proxied.base_url}/v1/messages",
        json=body,
        headers={"x-api-key": proxied.token},
        timeout=10,
    ) as response:
        chunks = response.iter_raw()
        next(chunks)
        next(chunks)
    # Long before the 20 s the stream would take.
    wait_until(
        lambda: fake_anthropic.streams_abandoned, timeout=5, what="the upstream stream to close"
    )
    assert fake_anthropic.streams_abandoned == 1
    audit_drained()
    assert AuditEvent.objects.get(action="proxy.request").outcome == "client_gone"


def test_a_revoked_token_is_refused_on_the_very_next_request_in_another_process(
    proxied: Proxied, fake_anthropic: FakeAnthropic, second_process: str
) -> None:
    url = f"{second_process}/v1/proxy/anthropic/v1/models"
    headers: dict[str, Any] = {"x-api-key": proxied.token}
    assert httpx.get(url, headers=headers).status_code == 200
    assert httpx.get(url, headers=headers).status_code == 200  # served from its cache

    token_revoke(token=Token.objects.get())

    refused = httpx.get(url, headers=headers)
    assert (refused.status_code, refused.json()["error"]["message"]) == (401, "token revoked")
    assert len(fake_anthropic.requests) == 2
    # Both processes wrote their audit events to the same database.
    wait_until(
        lambda: AuditEvent.objects.filter(action="proxy.request").count() >= 3,
        timeout=5,
        what="the second process to write its events",
    )
    assert os.environ.get("DJANGO_SETTINGS_MODULE") == "tests.settings"


@pytest.mark.django_db(transaction=True)
def test_a_vend_token_or_a_real_key_at_the_proxy_is_told_what_to_send_instead(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: Any
) -> None:
    """Issue 20, item 4: told by the credential's form alone, which says nothing about
    whether it is valid; the credential itself is never echoed."""
    vend_token = agent_enroll(name="carol", scopes=["anthropic"], approved_by=alice).vend_token
    hello = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": []}
    answers = {
        sent: httpx.post(f"{proxied.base_url}/v1/messages", headers=headers, json=hello)
        for sent, headers in {
            "vend": {"authorization": f"Bearer {vend_token}"},
            # What the SDK sends when ANTHROPIC_API_KEY is still set beside the token.
            "key": {"x-api-key": proxied.key, "authorization": f"Bearer {proxied.token}"},
        }.items()
    }
    assert {sent: a.status_code for sent, a in answers.items()} == {"vend": 401, "key": 401}
    vend, key = (answers[sent].json()["error"]["message"] for sent in ("vend", "key"))
    assert vend.startswith("this is an agent's vend token (ckr_…)")
    assert "keybroker get BACKEND" in vend
    assert key.startswith("this is an upstream API key, not a keybroker token")
    assert "unset it" in key
    assert fake_anthropic.requests == []
    everything = " ".join(a.text for a in answers.values())
    assert vend_token not in everything
    assert proxied.key not in everything
    audit_drained()
    refused = AuditEvent.objects.filter(status=401).order_by("id")
    assert [event.message for event in refused] == [vend, key]


@pytest.mark.django_db(transaction=True)
def test_an_sdk_pointed_at_keybrokers_root_is_told_where_the_proxy_is(
    live_url: str, proxied: Proxied, settings: Any
) -> None:
    """Issue 20, item 4: a base URL without /v1/proxy/BACKEND got an HTML 404 before."""
    settings.PUBLIC_URL = live_url
    client = anthropic.Anthropic(base_url=live_url, api_key=proxied.token, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as missed:
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(missed.value.body, dict)
    assert missed.value.body["error"]["message"] == (
        f"/v1/messages is not keybroker's proxy: set the SDK's base URL to "
        f"{live_url}/v1/proxy/BACKEND (OpenAI's SDKs: {live_url}/v1/proxy/BACKEND/v1), with a "
        "crd_ token as its key; `keybroker env BACKEND` prints both"
    )
    openai_style = httpx.post(f"{live_url}/v1/chat/completions", json={})
    assert openai_style.status_code == 404
    assert (
        "/v1/chat/completions is not keybroker's proxy" in openai_style.json()["error"]["message"]
    )
    # keybroker's own API under /v1/ is untouched.
    assert httpx.get(f"{live_url}/v1/status").status_code == 401
