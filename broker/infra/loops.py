"""State kept per asyncio event loop: connection pools, caches and queues that must never
cross loops (an asyncio object is bound to the loop it was made on).

Production has one loop per process; tests run servers in threads, each with its own loop,
beside the test's own. One ``LoopLocal`` per kind of state keeps that rule in one place.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """One ``T`` per running event loop, made by ``factory`` on first use and dropped with
    its loop."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        value = self._values.get(loop)
        if value is None:
            value = self._values[loop] = self._factory()
        return value

    def peek(self) -> T | None:
        """This loop's value if it has one, without making it."""
        return self._values.get(asyncio.get_running_loop())

    def replace(self, value: T) -> T:
        self._values[asyncio.get_running_loop()] = value
        return value

    def pop(self) -> T | None:
        return self._values.pop(asyncio.get_running_loop(), None)

    def every(self) -> Iterator[T]:
        """Every loop's value (for counts across the process' loops)."""
        return iter(list(self._values.values()))
