"""Per-loop state: one value per running event loop, never shared across loops."""

from __future__ import annotations

import asyncio
import gc

import pytest

from broker.infra.loops import LoopLocal


class Thing:
    pass


def test_each_loop_gets_its_own_value_and_keeps_it() -> None:
    things = LoopLocal(Thing)

    async def twice() -> tuple[Thing, Thing]:
        return things.get(), things.get()

    first, again = asyncio.run(twice())
    other, _ = asyncio.run(twice())
    assert first is again
    assert other is not first


def test_peek_and_pop_do_not_make_one() -> None:
    things = LoopLocal(Thing)

    async def use() -> None:
        assert things.peek() is None
        assert things.pop() is None
        made = things.get()
        assert things.peek() is made
        assert things.pop() is made
        assert things.peek() is None
        assert things.replace(Thing()) is things.get()

    asyncio.run(use())


def test_a_loops_value_goes_with_the_loop() -> None:
    things = LoopLocal(Thing)

    async def use() -> None:
        things.get()
        assert len(list(things.every())) == 1

    asyncio.run(use())
    gc.collect()
    assert list(things.every()) == []


def test_outside_a_loop_it_says_so() -> None:
    with pytest.raises(RuntimeError):
        LoopLocal(Thing).get()
