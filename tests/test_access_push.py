"""Access changes are pushed to the proxy processes (issue 13): a listening process reads
nothing from Redis per request, and a change answers only once every listening process
has dropped what it cached, so a revocation is in force everywhere when it returns."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import httpx
import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.test import override_settings

from broker.infra.redis import redis_client, redis_key
from broker.models import Backend, Token
from broker.services.access import ACCESS_ACK, ACCESS_CHANNEL, ACCESS_GENERATION, access_changed
from broker.services.agents import agent_enroll
from broker.services.tokens import token_issue, token_revoke, tokens_revoke
from proxy.access import LISTEN_CHECK_SECONDS
from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


class GenerationReads:
    """Every GET of the access generation Redis receives while it runs, from any client
    (Redis's MONITOR), so a test counts reads rather than trusting the code that sends them."""

    def __init__(self) -> None:
        self.count = 0
        self._key = redis_key(ACCESS_GENERATION)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1)
        with client.monitor() as monitor:  # type: ignore[no-untyped-call]
            self._ready.set()
            while not self._stop.is_set():
                try:
                    command = monitor.next_command()["command"]
                except redis.TimeoutError:
                    continue
                if command.split()[:2] == ["GET", self._key]:
                    self.count += 1

    def __enter__(self) -> GenerationReads:
        self._thread.start()
        self._ready.wait(timeout=5)
        return self

    def __exit__(self, *exc: object) -> None:
        # A last command, so the monitor wakes to see the stop.
        self._stop.set()
        redis_client().ping()
        self._thread.join(timeout=5)


def listeners() -> int:
    return int(redis_client().pubsub_numsub(redis_key(ACCESS_CHANNEL))[0][1])


def both_listen() -> None:
    """The live server of this session and the second process both follow changes."""
    wait_until(lambda: listeners() >= 2, timeout=10, what="both processes to listen")


def test_a_listening_process_reads_no_generation_per_request(
    proxied: Proxied, fake_anthropic: FakeAnthropic, second_process: str
) -> None:
    url = f"{second_process}/v1/proxy/anthropic/v1/models"
    headers = {"x-api-key": proxied.token}
    assert httpx.get(url, headers=headers).status_code == 200
    both_listen()
    calls = 40
    with GenerationReads() as reads, httpx.Client(headers=headers) as client:
        started = time.monotonic()
        for _ in range(calls):
            assert client.get(url).status_code == 200
        elapsed = time.monotonic() - started
    # What remains is the listeners' backstop: about one read a second per process.
    backstop = 2 * (int(elapsed) + 2)
    assert reads.count <= backstop < calls, (reads.count, elapsed)
    assert len(fake_anthropic.requests) == calls + 1


def test_a_revocation_holds_on_the_next_request_of_a_listening_process(
    proxied: Proxied,
    fake_anthropic: FakeAnthropic,
    second_process: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    url = f"{second_process}/v1/proxy/anthropic/v1/models"
    headers = {"x-api-key": proxied.token}
    assert httpx.get(url, headers=headers).status_code == 200
    both_listen()
    assert httpx.get(url, headers=headers).status_code == 200  # from its cache, no read

    token_revoke(token=Token.objects.get())

    refused = httpx.get(url, headers=headers)
    assert (refused.status_code, refused.json()["error"]["message"]) == (401, "token revoked")
    # The database's copy of the generation, read by the listeners a second later, is the
    # value they were told: not taken for a change Redis never announced (the live
    # server's listener logs here, in this process).
    time.sleep(LISTEN_CHECK_SECONDS * 1.5)
    assert "that Redis never told" not in caplog.text


class SlowListener:
    """A process listening for access changes that confirms each one after ``delay``
    seconds (never, with None), recording when it did."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.confirmed: list[str] = []
        self._pubsub = redis_client().pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(redis_key(ACCESS_CHANNEL))
        self._pubsub.get_message(timeout=5)  # the subscription is confirmed
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        message: Any
        for message in self._pubsub.listen():
            if message["type"] == "unsubscribe":
                return
            if message["type"] != "message" or self.delay is None:
                continue
            time.sleep(self.delay)  # a process slow to confirm, on purpose
            generation = message["data"].decode()
            self.confirmed.append(generation)
            redis_client().rpush(redis_key(ACCESS_ACK, generation), b"1")

    def __enter__(self) -> SlowListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._pubsub.unsubscribe()
        self._thread.join(timeout=5)
        self._pubsub.close()


def test_a_change_returns_only_once_every_listener_confirmed_it() -> None:
    with SlowListener(delay=0.2) as listener:
        access_changed()  # outside a transaction: announced at once
        announced = redis_client().get(redis_key(ACCESS_GENERATION))
        assert isinstance(announced, bytes)
        assert listener.confirmed == [announced.decode()], "returned before the confirmation"


def test_a_listener_that_never_confirms_delays_a_change_only_briefly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with SlowListener(delay=None) as listener, caplog.at_level(logging.WARNING):
        access_changed()
        assert listener.confirmed == []
    # Any proxy of this test session listening too has confirmed; only the mute one is late.
    assert re.search(r"\b1 of \d+ proxy processes did not confirm an access change", caplog.text)
    # Nothing is left behind for the change that was not confirmed.
    generation = redis_client().get(redis_key(ACCESS_GENERATION))
    assert isinstance(generation, bytes)
    assert not redis_client().exists(redis_key(ACCESS_ACK, generation.decode()))


def test_revoking_several_tokens_together_is_announced_once(
    alice: AbstractBaseUser, anthropic: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    agent = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    tokens = [token_issue(agent=agent, backend_name="anthropic", ttl="5m").token for _ in range(5)]
    with SlowListener(delay=0) as listener:
        assert tokens_revoke(tokens=tokens) == 5
    assert Token.objects.filter(revoked_at__isnull=True).count() == 0
    announced = redis_client().get(redis_key(ACCESS_GENERATION))
    assert isinstance(announced, bytes)
    assert listener.confirmed == [announced.decode()]  # one announcement, of the last value

    # With Redis out of the announcer's reach, the one wait covers them all.
    more = [token_issue(agent=agent, backend_name="anthropic", ttl="5m").token for _ in range(3)]
    with (
        override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
        caplog.at_level(logging.ERROR),
    ):
        tokens_revoke(tokens=more)
    assert caplog.text.count("could not announce an access change") == 1
