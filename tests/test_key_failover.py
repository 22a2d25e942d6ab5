"""A pool's failover on the upstream's own failures (issue 15): a 500, 502, 503 or 504, or a
call that never reached the upstream (reset, refused, connect timeout), before anything
went to the client, is sent once more with another healthy key; the audit names both keys.

Through the live server against the fake upstream; connection failures through a TCP door
in front of it (tests/fake_door.py), a port nobody listens on, and one that never accepts.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from audit.models import AuditEvent
from broker.infra.redis import redis_client
from broker.models import Backend
from broker.selectors.backend_keys import key_cooldown_name, keys_of
from broker.services.access import access_changed
from proxy.keys import cooldown_seconds
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic, error
from tests.fake_door import FakeDoor, door_in_thread
from tests.proxy_cast import Proxied, audit_drained
from tests.test_key_pools import HELLO, RATE_LIMITED, call, run, two_keys

pytestmark = pytest.mark.django_db(transaction=True)

API_ERROR = error("api_error", "Internal server error")


@pytest.fixture(scope="module")
def _door_server(_fake_anthropic_server: FakeAnthropic) -> Iterator[FakeDoor]:
    port = int(_fake_anthropic_server.url.rsplit(":", 1)[1])
    door = door_in_thread(free_port(), port)
    yield door
    door.stop()


@pytest.fixture
def door(_door_server: FakeDoor, fake_anthropic: FakeAnthropic) -> Iterator[FakeDoor]:
    """The door, fresh for each test: it drops nothing until told to."""
    _door_server.reset()
    yield _door_server
    assert _door_server.failures == []
    _door_server.reset()


def moved_to(proxied: Proxied, base_url: str) -> None:
    """The backend now calls ``base_url``, as every process sees on its next call."""
    Backend.objects.filter(pk=proxied.backend.pk).update(base_url=base_url)
    access_changed()


def events() -> list[AuditEvent]:
    audit_drained()
    return list(AuditEvent.objects.filter(action="proxy.request").order_by("id"))


def fingerprints(proxied: Proxied) -> dict[str, str]:
    return {k.secret: k.fingerprint for k in keys_of(proxied.backend)}


def health(fingerprint: str) -> dict[str, Any]:
    shown = {k["fingerprint"]: k for k in json.loads(run("keys", "anthropic", "--json"))}
    return dict(shown[fingerprint]["health"])


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_server_error_before_the_first_byte_fails_over_to_the_other_key(
    proxied: Proxied, fake_anthropic: FakeAnthropic, status: int
) -> None:
    two_keys(proxied, fake_anthropic)
    fake_anthropic.answer_next(status, API_ERROR)
    answer = call(proxied)
    assert answer.status_code == 200
    assert answer.json()["type"] == "message"
    tried, served = fake_anthropic.seen_keys()
    assert tried != served
    named = fingerprints(proxied)
    (event,) = events()
    assert (event.status, event.outcome) == (200, "ok")
    assert event.detail["key_fingerprint"] == named[served]
    assert event.detail["retried"] is True
    assert event.detail["failed_key_fingerprint"] == named[tried]
    assert event.detail["failed_status"] == status
    assert "failed_error" not in event.detail
    # Set aside (for a second: test_a_server_errors_cooldown_is_shorter_than_a_rate_limits).
    assert health(named[tried])["last_error"].startswith(f"{status} at ")
    assert tried not in json.dumps(event.detail)


def test_a_server_errors_cooldown_is_shorter_than_a_rate_limits(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    """Both ask for an hour; a 5xx gets at most 30 s, a 429 at most 5 min."""
    two_keys(proxied, fake_anthropic)
    before = time.time()
    fake_anthropic.answer_next(503, API_ERROR, retry_after="3600")
    assert call(proxied).status_code == 200
    after = time.time()
    failed = fingerprints(proxied)[fake_anthropic.seen_keys()[0]]
    until = health(failed)["until"]
    assert before + 30 <= until <= after + 30
    # While it cools, every call goes out with the other key at once.
    fake_anthropic.requests.clear()
    assert [call(proxied).status_code for _ in range(4)] == [200] * 4
    assert fingerprints(proxied)[fake_anthropic.seen_keys()[0]] != failed
    assert len(set(fake_anthropic.seen_keys())) == 1

    # The other key rate limited: set aside for 5 min; the first still cools, so the client
    # gets the 429.
    fake_anthropic.requests.clear()
    before = time.time()
    fake_anthropic.answer_next(429, RATE_LIMITED, retry_after="3600")
    assert call(proxied).status_code == 429
    after = time.time()
    (limited,) = [fingerprints(proxied)[key] for key in fake_anthropic.seen_keys()]
    assert limited != failed
    assert before + 300 <= health(limited)["until"] <= after + 300


def test_the_backoffs_without_retry_after() -> None:
    def backoffs(status: int | None) -> list[float]:
        return [cooldown_seconds(status=status, retry_after="", strikes=n) for n in range(1, 9)]

    assert backoffs(503) == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoffs(None) == [1, 2, 4, 8, 16, 30, 30, 30]  # the upstream was not reached
    assert backoffs(429) == [5, 10, 20, 40, 80, 160, 300, 300]
    assert backoffs(401) == [60] * 8
    assert cooldown_seconds(status=500, retry_after="7", strikes=3) == 7
    assert cooldown_seconds(status=None, retry_after="7", strikes=1) == 1  # nothing asked


def test_a_server_error_the_upstream_says_not_to_retry_goes_to_the_client(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    two_keys(proxied, fake_anthropic)
    fake_anthropic.answer_next(500, API_ERROR, x_should_retry="false")
    answer = call(proxied)
    assert (answer.status_code, answer.json()) == (500, API_ERROR)
    assert answer.headers["x-should-retry"] == "false"
    (tried,) = fake_anthropic.seen_keys()
    (event,) = events()
    assert "retried" not in event.detail
    assert health(fingerprints(proxied)[tried])["state"] == "ok"  # not the key's fault


def test_when_the_other_key_cools_the_client_gets_the_server_error_unchanged(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    first, second = two_keys(proxied, fake_anthropic)
    # The second key cools down, as the proxy records it: the first is the only one healthy.
    redis_client().set(key_cooldown_name("anthropic", second), f"{time.time() + 60}", ex=60)
    fake_anthropic.answer_next(503, API_ERROR, retry_after="2")
    answer = call(proxied)
    assert (answer.status_code, answer.json()) == (503, API_ERROR)
    assert answer.headers["retry-after"] == "2"
    assert fake_anthropic.seen_keys() == [proxied.key]
    (event,) = events()
    assert (event.status, event.outcome) == (503, "upstream_error")
    assert event.detail["key_fingerprint"] == first
    assert "retried" not in event.detail


def test_when_both_keys_fail_the_client_gets_the_second_answer(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    two_keys(proxied, fake_anthropic)
    second_error = error("api_error", "the second key's failure")
    fake_anthropic.answer_next(502, API_ERROR)
    fake_anthropic.answer_next(500, second_error)
    answer = call(proxied)
    assert (answer.status_code, answer.json()) == (500, second_error)
    tried, served = fake_anthropic.seen_keys()
    assert tried != served
    (event,) = events()
    assert (event.status, event.detail["retried"], event.detail["failed_status"]) == (
        500,
        True,
        502,
    )
    named = fingerprints(proxied)
    assert (event.detail["failed_key_fingerprint"], event.detail["key_fingerprint"]) == (
        named[tried],
        named[served],
    )
    # Both set aside: the next call tries one of them once and gets its answer, no retry.
    fake_anthropic.requests.clear()
    fake_anthropic.answer_next(503, API_ERROR)
    assert call(proxied).status_code == 503
    assert len(fake_anthropic.requests) == 1


def test_a_connection_reset_before_any_answer_fails_over(
    proxied: Proxied, fake_anthropic: FakeAnthropic, door: FakeDoor
) -> None:
    two_keys(proxied, fake_anthropic)
    moved_to(proxied, door.url)
    door.drop_next = 1
    answer = call(proxied)
    assert answer.status_code == 200
    (dropped,) = door.dropped
    (served,) = fake_anthropic.seen_keys()  # the dropped call never reached the fake
    assert dropped != served
    named = fingerprints(proxied)
    (event,) = events()
    assert (event.status, event.detail["retried"]) == (200, True)
    assert event.detail["key_fingerprint"] == named[served]
    assert event.detail["failed_key_fingerprint"] == named[dropped]
    assert event.detail["failed_error"].startswith("unreachable (")
    assert "failed_status" not in event.detail
    assert health(named[dropped])["last_error"].startswith("unreachable (")


def test_a_stream_whose_connection_resets_before_its_first_byte_is_sent_again(
    proxied: Proxied, fake_anthropic: FakeAnthropic, door: FakeDoor
) -> None:
    two_keys(proxied, fake_anthropic)
    moved_to(proxied, door.url)
    door.drop_next = 1
    with httpx.stream(
        "POST",
        f"{proxied.base_url}/v1/messages",
        headers={"x-api-key": proxied.token},
        json={**HELLO, "stream": True},
        timeout=10,
    ) as response:
        body = b"".join(response.iter_bytes())
    assert response.status_code == 200
    assert b"event: message_stop" in body
    assert len(door.dropped) == 1
    assert len(fake_anthropic.requests) == 1
    (event,) = events()
    assert (event.outcome, event.detail["retried"]) == ("ok", True)


def test_when_no_key_reaches_the_upstream_the_client_gets_a_clear_502(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    two_keys(proxied, fake_anthropic)
    moved_to(proxied, f"http://127.0.0.1:{free_port()}")  # nobody listens there
    answer = call(proxied)
    assert answer.status_code == 502
    assert answer.json() == {
        "type": "error",
        "error": {
            "type": "api_error",
            "message": "upstream anthropic unreachable (ClientConnectorError)",
        },
    }
    (event,) = events()
    assert (event.status, event.outcome) == (502, "upstream_unreachable")
    assert event.detail["retried"] is True
    assert event.detail["failed_error"] == "unreachable (ClientConnectorError)"
    assert {event.detail["failed_key_fingerprint"], event.detail["key_fingerprint"]} == set(
        fingerprints(proxied).values()
    )
    assert {health(fp)["last_error"][:25] for fp in fingerprints(proxied).values()} == {
        "unreachable (ClientConnec"
    }


@pytest.fixture
def never_accepts() -> Iterator[str]:
    """A port whose listener never accepts, its queue full: a connect there times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    for _ in range(3):
        waiting = socket.socket()
        waiting.setblocking(False)
        waiting.connect_ex(("127.0.0.1", port))
        queued.append(waiting)
    yield f"http://127.0.0.1:{port}"
    for waiting in queued:
        waiting.close()
    listener.close()


def test_a_connect_timeout_on_every_key_is_a_504(
    proxied: Proxied, fake_anthropic: FakeAnthropic, never_accepts: str, settings: Any
) -> None:
    settings.PROXY_CONNECT_TIMEOUT_SECONDS = 1
    two_keys(proxied, fake_anthropic)
    moved_to(proxied, never_accepts)
    answer = call(proxied)
    assert answer.status_code == 504
    assert answer.json()["error"] == {
        "type": "api_error",
        "message": "upstream anthropic timed out",
    }
    (event,) = events()
    assert (event.outcome, event.detail["retried"]) == ("upstream_timeout", True)
    assert event.detail["failed_error"] == "connect timeout"


@pytest.mark.parametrize("broken", ["server_error", "unreachable"])
def test_a_one_key_backend_neither_retries_nor_cools_down(
    proxied: Proxied, fake_anthropic: FakeAnthropic, broken: str
) -> None:
    if broken == "server_error":
        fake_anthropic.answer_next(503, API_ERROR)
        assert call(proxied).status_code == 503
        assert len(fake_anthropic.requests) == 1
    else:
        moved_to(proxied, f"http://127.0.0.1:{free_port()}")
        assert call(proxied).status_code == 502
    (event,) = events()
    assert "retried" not in event.detail
    assert health(proxied.backend.secret_fingerprint) == {
        "state": "ok",
        "until": None,
        "last_error": "",
    }
