"""Held calls at the proxy: a call its grant's hold rule matches waits, unanswered, for a
person's decision (broker/services/held.py keeps the records every process shares).

While a call is held its client sees nothing, not even response headers. The decision
arrives over Redis pub/sub, with a read of the waiting calls' decision keys every
``POLL_SECONDS`` as a backstop, so a page served by any process can decide. Approved, the
call goes on exactly as it was sent; denied, or with no decision by its deadline, it gets a
403 in the provider's error shape naming why. A client that hangs up withdraws its hold.
A process that stops answers its held calls with a denial (``HoldDesk.close``, and the
cancellation uvicorn sends its calls at the end of a graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import redis

from audit.recorder import audit_enqueue
from broker.infra.loops import LoopLocal
from broker.infra.redis import async_redis_client, redis_key
from broker.services.held import (
    DENIED,
    EXPIRED,
    HELD_CHANNEL,
    HELD_INDEX,
    STOPPED_BY,
    WITHDRAWN,
    Decision,
    HeldCall,
    decision_key,
    held_key,
)
from keybroker.wire import duration_format
from proxy.forwarding import Receive, wait_for_disconnect
from proxy.policy import FORBIDDEN, PolicyDenied
from proxy.record import Exchange

logger = logging.getLogger(__name__)

# How often the decision keys of this process's held calls are read besides the news.
POLL_SECONDS = 0.5
RETRY_SECONDS = 0.5
STOPPED_REASON = "keybroker stopped while the call was held"
STOP_WAIT_SECONDS = 3.0


class _Stopping(Exception):
    """The process stops: its held calls are denied."""


class HoldDesk:
    """Per event loop: this process's held calls and the one task that hears decisions."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Decision]] = {}
        self._listener: asyncio.Task[None] | None = None
        # The tasks of calls held since, until each has answered its client: a stopping
        # process waits for them (``close``), or its denials would die with it.
        self._calls: set[asyncio.Task[object]] = set()

    async def hold(self, exchange: Exchange, *, rule: str, timeout: int, receive: Receive) -> bool:
        """Hold the call until a person decides. True: approved, send it on; False: its
        client hung up meanwhile. Raises PolicyDenied when denied or nobody decided."""
        access = exchange.access
        assert access is not None  # held only after its token was read
        facts = exchange.facts or {}
        now = time.time()
        call = HeldCall(
            id=f"hld_{secrets.token_hex(8)}",
            agent=access.agent_name,
            agent_id=access.agent_id,
            backend=exchange.backend,
            method=exchange.method,
            path=exchange.path,
            model=str(facts.get("model", "")),
            max_tokens=facts.get("max_tokens"),
            stream=bool(facts.get("stream")),
            rule=rule,
            token_prefix=access.token_prefix,
            held_at=now,
            deadline=now + timeout,
        )
        exchange.hold_id = call.id
        started = time.perf_counter()
        task = asyncio.current_task()
        if task is not None:
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        try:
            await self._register(call)
        except (redis.RedisError, OSError) as exc:
            logger.error("a call to hold was refused: Redis unreachable (%s)", type(exc).__name__)
            raise PolicyDenied(
                503,
                "api_error",
                rule="hold",
                message="this call needs a person's approval, and held calls cannot be recorded "
                "right now (Redis unreachable); retry shortly",
            ) from None
        _audit(call, "proxy.held", f"held for approval ({rule}), up to {duration_format(timeout)}",
               hold_rule=rule, timeout=timeout, held_until=call.json()["deadline"],
               max_tokens=call.max_tokens)  # fmt: skip
        decided: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._waiting[call.id] = decided
        self._follow()
        gone = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait(
                (decided, gone),
                timeout=call.deadline - time.time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            # uvicorn gave up waiting for open calls at the end of its graceful shutdown.
            if task is not None:
                task.uncancel()
            decided.cancel()
            decided = asyncio.get_running_loop().create_future()
            decided.set_exception(_Stopping())
        finally:
            gone.cancel()
            self._waiting.pop(call.id, None)
        exchange.held_seconds = time.perf_counter() - started
        if decided.done() and not decided.cancelled() and decided.exception() is None:
            decision = decided.result()
        elif decided.done() and not decided.cancelled():
            decision = await self._claim(call, Decision(DENIED, STOPPED_BY, STOPPED_REASON))
        elif gone.done() and not gone.cancelled():
            decision = await self._claim(call, Decision(WITHDRAWN))
        else:
            decision = await self._claim(call, Decision(EXPIRED))
        exchange.hold_decision = decision.decision
        await self._unlist(call)
        if gone.done() and not gone.cancelled():
            return False  # whatever was decided, nobody is there to answer
        if decision.approved:
            return True
        if decision.decision == EXPIRED:
            message = f"held for approval for {duration_format(timeout)}, and nobody decided"
        else:
            message = f"held for approval and {decision.said()}"
        raise PolicyDenied(*FORBIDDEN, rule="hold", message=message, retry=False)

    async def _register(self, call: HeldCall) -> None:
        writing = async_redis_client().pipeline(transaction=True)
        writing.set(held_key(call.id), call.encode(), ex=call.ttl)
        writing.zadd(redis_key(HELD_INDEX), {call.id: call.deadline * 1000})
        await writing.execute()

    async def _claim(self, call: HeldCall, mine: Decision) -> Decision:
        """Record a decision nobody made (expired, withdrawn, stopped) unless a person's
        came first: the first decision wins. Redis unreachable: this one stands, unrecorded
        there (the hold's TTL ends it), audited all the same."""
        mine = Decision(mine.decision, mine.by, mine.reason, time.time())
        client = async_redis_client()
        try:
            if not await client.set(decision_key(call.id), mine.encode(), nx=True, ex=call.ttl):
                raw = await client.get(decision_key(call.id))
                if raw is not None:
                    return Decision.decode(raw)
        except (redis.RedisError, OSError) as exc:
            logger.warning("a held call's end was not recorded in Redis (%s)", type(exc).__name__)
        _audit(call, "proxy.hold_decided", f"held call {call.method} {call.path} {mine.said()}",
               decision=mine.decision, decided_by=mine.by, reason=mine.reason,
               held_ms=round((mine.at - call.held_at) * 1000, 2))  # fmt: skip
        return mine

    async def _unlist(self, call: HeldCall) -> None:
        """Out of the index at once; left there, the listing skips it as decided."""
        try:
            await async_redis_client().zrem(redis_key(HELD_INDEX), call.id)
        except (redis.RedisError, OSError) as exc:
            logger.debug("a held call stays listed until its deadline (%s)", type(exc).__name__)

    def _follow(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        """Runs while this process holds calls: news of decisions, and a read of their
        keys after each piece of news and every POLL_SECONDS without."""
        while self._waiting:
            pubsub = async_redis_client().pubsub()
            try:
                await pubsub.subscribe(redis_key(HELD_CHANNEL))
                while self._waiting:
                    await self._read_decisions()
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_SECONDS)
            except (redis.RedisError, OSError) as exc:
                logger.warning("held calls: decisions unread (%s); retrying", type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _read_decisions(self) -> None:
        ids = list(self._waiting)
        if not ids:
            return
        values = await async_redis_client().mget([decision_key(held_id) for held_id in ids])
        for held_id, raw in zip(ids, values, strict=True):
            decided = self._waiting.get(held_id)
            if raw is not None and decided is not None and not decided.done():
                decided.set_result(Decision.decode(raw))

    async def close(self) -> None:
        """The process stops: every call still held is denied, then the listener ends."""
        for decided in self._waiting.values():
            if not decided.done():
                decided.set_exception(_Stopping())
        # Each answers at once; a bound all the same, as a shutdown must end.
        calls = {call for call in self._calls if call is not asyncio.current_task()}
        if calls:
            await asyncio.wait(calls, timeout=STOP_WAIT_SECONDS)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener


def _audit(call: HeldCall, action: str, message: str, **fields: Any) -> None:
    audit_enqueue(
        action=action,
        agent=call.agent,
        agent_id=call.agent_id,
        backend=call.backend,
        message=message,
        method=call.method,
        path=call.path,
        model=call.model,
        token=call.token_prefix,
        streamed=call.stream,
        hold_id=call.id,
        **fields,
    )


_desks = LoopLocal(HoldDesk)


def hold_desk() -> HoldDesk:
    return _desks.get()
