"""The access token cache of federated backends: one exchange at a time, in a process and
across processes, and what happens when an exchange or Redis fails."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.services import federation
from broker.services.federation import (
    FederatedToken,
    Federation,
    FederationError,
    federation_token,
    refresh_margin,
)
from proxy import federation as proxy_federation
from proxy.federation import FederationCache

FEDERATION = Federation(
    backend="wif",
    base_url="https://upstream.invalid",
    audience="https://api.anthropic.com",
    federation_rule_id="fdrl_single",
    organization_id="6f1c2a4e-1b7d-4c3e-9a2f-0d5e8b7c6a91",
)


def token(name: str, lifetime: float = 3600) -> FederatedToken:
    now = federation.clock()
    return FederatedToken(name, now + lifetime, now + lifetime - refresh_margin(lifetime))


@pytest.mark.parametrize(
    ("lifetime", "margin"), [(3600, 360), (600, 60), (300, 60), (100, 50), (60, 30)]
)
def test_a_token_is_refreshed_a_minute_or_a_tenth_of_its_life_early(
    lifetime: int, margin: int
) -> None:
    assert refresh_margin(lifetime) == margin


async def test_concurrent_calls_in_a_process_await_one_exchange(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Federation] = []
    release = asyncio.Event()

    async def slow_exchange(federation_: Federation) -> FederatedToken:
        calls.append(federation_)
        await release.wait()
        return token("sk-ant-oat01-one")

    monkeypatch.setattr(proxy_federation, "_federation_token", slow_exchange)
    cache = FederationCache()
    waiting = [asyncio.ensure_future(cache.token(FEDERATION)) for _ in range(200)]
    for _ in range(3):
        await asyncio.sleep(0)  # every call has reached the point where it waits
    assert len(calls) == 1
    assert not any(task.done() for task in waiting)

    release.set()
    assert set(await asyncio.gather(*waiting)) == {"sk-ant-oat01-one"}
    assert await cache.token(FEDERATION) == "sk-ant-oat01-one"  # from memory now
    assert len(calls) == 1


async def test_a_failed_refresh_keeps_serving_the_token_that_has_not_expired(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    answers: list[FederatedToken | FederationError] = [
        token("sk-ant-oat01-first"),
        FederationError("token exchange: cannot reach upstream", unreachable=True),
    ]

    async def exchange(federation_: Federation) -> FederatedToken:
        answer = answers.pop(0)
        if isinstance(answer, FederationError):
            raise answer
        return answer

    monkeypatch.setattr(proxy_federation, "_federation_token", exchange)
    cache = FederationCache()
    assert await cache.token(FEDERATION) == "sk-ant-oat01-first"
    real_clock = federation.clock
    monkeypatch.setattr(federation, "clock", lambda: real_clock() + 3400)  # due, not expired
    assert await cache.token(FEDERATION) == "sk-ant-oat01-first"
    assert answers == []  # the refresh was tried
    assert "refreshing its access token failed" in caplog.text

    monkeypatch.setattr(federation, "clock", lambda: real_clock() + 3595)  # all but expired
    with pytest.raises(FederationError, match="cannot reach upstream"):
        await cache.token(FEDERATION)  # within the cool-down: not even tried again


@pytest.mark.django_db
def test_processes_wait_for_the_one_that_holds_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_exchange(federation_: Federation) -> FederatedToken:
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        return token("sk-ant-oat01-shared")

    monkeypatch.setattr(federation, "federation_exchange", slow_exchange)
    results: dict[str, FederatedToken] = {}

    def process(name: str) -> None:
        results[name] = federation_token(FEDERATION)

    first = threading.Thread(target=process, args=("first",), name="first")
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=process, args=("second",), name="second")
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "the second process must wait while the first exchanges"

    release.set()
    first.join(10)
    second.join(10)
    assert calls == ["first"]
    assert results["first"].token == results["second"].token == "sk-ant-oat01-shared"
    assert federation_token(FEDERATION).token == "sk-ant-oat01-shared"
    assert calls == ["first"]


@pytest.mark.django_db
def test_without_redis_each_process_exchanges_for_itself(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    dead = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(federation, "redis_client", lambda: dead)
    calls: list[Any] = []

    def exchange(federation_: Federation) -> FederatedToken:
        calls.append(federation_)
        return token("sk-ant-oat01-alone")

    monkeypatch.setattr(federation, "federation_exchange", exchange)
    assert federation_token(FEDERATION).token == "sk-ant-oat01-alone"
    assert len(calls) == 1
    assert "Redis unreachable; exchanging without the shared token cache" in caplog.text
