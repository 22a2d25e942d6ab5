"""Waiting on a condition, not for a while: a test that waits polls what it waits for, and
fails at a deadline naming it instead of carrying on as if it had happened."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# What is awaited, for the message at the deadline; a callable is asked then, so it can say
# what it saw last.
What = str | Callable[[], str]


def _gave_up(what: What, timeout: float) -> AssertionError:
    described = what() if callable(what) else what
    return AssertionError(f"gave up after {timeout}s waiting for {described}")


def wait_until(
    condition: Callable[[], T], *, timeout: float, what: What, interval: float = 0.02
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    AssertionError naming ``what`` when it is still falsy after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _gave_up(what, timeout)
        time.sleep(interval)


async def until(
    condition: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: What,
    interval: float = 0.01,
) -> T:
    """`wait_until` inside a coroutine: polls without blocking the event loop; ``condition``
    may be a plain function or a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _gave_up(what, timeout)
        await asyncio.sleep(interval)
