"""A call already open when its access is withdrawn is closed within a second, in every
process: revoked token, unenrolled agent, removed grant, disabled backend (issue 19)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anthropic
import pytest

from audit.models import AuditEvent
from broker.models import Agent, Backend, Token
from broker.services.access import access_changed
from broker.services.agents import agent_unenroll, agent_ungrant
from broker.services.backends import backend_update
from broker.services.tokens import token_revoke
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello"}]


class StreamWatcher:
    """Reads a long stream in a thread and notes when each text delta arrived."""

    def __init__(self, base_url: str, token: str) -> None:
        self.client = anthropic.Anthropic(base_url=base_url, api_key=token, max_retries=0)
        self.arrivals: list[float] = []
        self.error: Exception | None = None
        self.ended_at = 0.0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with self.client.messages.stream(
                model="claude-haiku-4-5", max_tokens=64, messages=HELLO
            ) as stream:
                for _ in stream.text_stream:
                    self.arrivals.append(time.monotonic())
        except Exception as exc:  # what the SDK raises is what the test looks at
            self.error = exc
        self.ended_at = time.monotonic()

    def wait_for_deltas(self, count: int) -> None:
        wait_until(
            lambda: len(self.arrivals) >= count,
            timeout=10,
            what=f"the stream to start ({count} deltas)",
            interval=0.01,
        )


def withdraw_and_watch(
    fake: FakeAnthropic, base_url: str, token: str, withdraw: Callable[[], Any]
) -> StreamWatcher:
    fake.stream_deltas = 100
    fake.stream_gap_seconds = 0.1  # ten seconds of stream if nothing stops it
    stream = StreamWatcher(base_url, token)
    stream.wait_for_deltas(2)
    withdrawn_at = time.monotonic()
    withdraw()
    stream.thread.join(timeout=10)
    assert not stream.thread.is_alive(), "the stream was not closed"
    assert stream.ended_at - withdrawn_at < 1.0
    assert len([t for t in stream.arrivals if t > withdrawn_at + 0.1]) <= 9
    assert len(stream.arrivals) < 50
    return stream


def the_token(proxied: Proxied) -> Token:
    return Token.objects.select_related("agent", "backend").get(pk=proxied.token_id)


def test_revoking_a_token_closes_its_open_stream_with_an_error_the_sdk_raises(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    stream = withdraw_and_watch(
        fake_anthropic,
        proxied.base_url,
        proxied.token,
        lambda: token_revoke(token=the_token(proxied), reason="leaked"),
    )
    assert isinstance(stream.error, anthropic.APIStatusError)
    assert "token revoked: this call was closed" in str(stream.error)
    wait_until(
        lambda: fake_anthropic.streams_abandoned,
        timeout=5,
        what="the upstream request to be closed too",
    )
    assert fake_anthropic.streams_abandoned == 1
    audit_drained()
    event = AuditEvent.objects.get(action="proxy.request")
    assert (event.outcome, event.status) == ("revoked", 200)
    assert event.message == "token revoked: this call was closed"


def test_unenrolling_the_agent_closes_its_open_stream(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    stream = withdraw_and_watch(
        fake_anthropic,
        proxied.base_url,
        proxied.token,
        lambda: agent_unenroll(agent=Agent.objects.get(name="bob")),
    )
    assert stream.error is not None


def test_removing_the_grant_closes_the_open_stream(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    stream = withdraw_and_watch(
        fake_anthropic,
        proxied.base_url,
        proxied.token,
        lambda: agent_ungrant(
            agent=Agent.objects.get(name="bob"), backend=Backend.objects.get(name="anthropic")
        ),
    )
    assert stream.error is not None


def test_disabling_the_backend_closes_the_open_stream(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    stream = withdraw_and_watch(
        fake_anthropic,
        proxied.base_url,
        proxied.token,
        lambda: backend_update(backend=Backend.objects.get(name="anthropic"), enabled=False),
    )
    assert "backend anthropic is disabled" in str(stream.error)


def test_a_stream_through_another_process_is_closed_too(
    proxied: Proxied,
    fake_anthropic: FakeAnthropic,
    second_process: str,
) -> None:
    stream = withdraw_and_watch(
        fake_anthropic,
        f"{second_process}/v1/proxy/anthropic",
        proxied.token,
        lambda: token_revoke(token=the_token(proxied)),
    )
    assert "token revoked" in str(stream.error)


def test_other_tokens_streams_keep_flowing(proxied: Proxied, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.stream_deltas = 10
    fake_anthropic.stream_gap_seconds = 0.05
    stream = StreamWatcher(proxied.base_url, proxied.token)
    stream.wait_for_deltas(1)
    # Any access change makes every process look again; this stream's token is still good.
    access_changed()
    stream.thread.join(timeout=10)
    assert stream.error is None
    assert len(stream.arrivals) == 10
