"""The proxy's access generation: read once for every request that arrives while a read is
on its way, and never a read sent before a request arrived (issue 13).

A fake Redis client holds each GET until the test lets it answer, so the order of arrivals
and answers is the test's, not the scheduler's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import proxy.access
from proxy.access import AccessCache


class HeldRedis:
    """Answers GET with the generation it holds at the moment the GET is sent, once the
    test releases that GET."""

    def __init__(self, generation: bytes) -> None:
        self.generation = generation
        self.sent: list[asyncio.Event] = []

    async def get(self, key: str) -> bytes:
        value = self.generation  # what Redis holds when the command reaches it
        release = asyncio.Event()
        self.sent.append(release)
        await release.wait()
        return value


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> HeldRedis:
    fake = HeldRedis(b"1")
    monkeypatch.setattr(proxy.access, "async_redis_client", lambda: fake)
    return fake


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_arriving_during_a_read_share_the_next_one(held: HeldRedis) -> None:
    cache = AccessCache()
    first = asyncio.ensure_future(cache._fresh())
    await settle()
    assert len(held.sent) == 1
    waiting = [asyncio.ensure_future(cache._fresh()) for _ in range(20)]
    await settle()
    assert len(held.sent) == 1, "a request arriving during a read must not trust it"
    held.sent[0].set()
    await settle()
    assert first.done()
    assert first.result() is True
    assert len(held.sent) == 2, "the twenty waiting requests share one read"
    assert not any(w.done() for w in waiting)
    held.sent[1].set()
    assert await asyncio.gather(*waiting) == [True] * 20
    assert len(held.sent) == 2


async def test_a_change_made_after_a_read_was_sent_is_seen_by_a_later_request(
    held: HeldRedis,
) -> None:
    cache = AccessCache()
    cache._generation = b"1"  # what the cache was filled under
    cache._tokens["digest"] = (None, 0.0)
    first = asyncio.ensure_future(cache._fresh())
    await settle()
    held.generation = b"2"  # a revocation committed while the first read is on its way
    later = asyncio.ensure_future(cache._fresh())
    await settle()
    held.sent[0].set()
    await settle()
    assert first.result() is True
    assert cache._generation == b"1"
    assert "digest" in cache._tokens, "generation 1 was read before the change"
    held.sent[1].set()
    assert await later is True
    assert cache._generation == b"2"
    assert "digest" not in cache._tokens, "the later request saw the change: cache dropped"


async def test_a_waiting_request_that_is_cancelled_leaves_the_others_their_read(
    held: HeldRedis,
) -> None:
    cache = AccessCache()
    first = asyncio.ensure_future(cache._fresh())
    await settle()
    gone, staying = (asyncio.ensure_future(cache._fresh()) for _ in range(2))
    await settle()
    gone.cancel()
    held.sent[0].set()
    await settle()
    held.sent[1].set()
    assert await staying is True
    assert await first is True


async def test_without_redis_no_request_trusts_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    class Down:
        async def get(self, key: str) -> Any:
            await asyncio.sleep(0)
            raise ConnectionError("redis is down")

    monkeypatch.setattr(proxy.access, "async_redis_client", lambda: Down())
    cache = AccessCache()
    assert await asyncio.gather(*(cache._fresh() for _ in range(5))) == [False] * 5
