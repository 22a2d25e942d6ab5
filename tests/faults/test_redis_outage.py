"""Redis down, then frozen, under steady load: keybroker's web processes answer every call
in bounded time, refuse only what needs Redis (unless told to fail open), keep refusing a
token revoked during the outage, and write every call into the audit trail.

The Redis broken here is the test's own (tests/faults/processes.py): other runs share the
machine's, which must never be stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection

from audit.models import AuditEvent
from broker.infra.redis import redis_client
from broker.models import Token
from broker.services.backends import backend_add
from broker.services.tokens import IssuedToken, token_revoke
from tests.fake_anthropic import FakeAnthropic
from tests.faults.cast import ANSWER_BOUND_SECONDS, Answer, agent_token, call
from tests.faults.figures import Figure, Figures
from tests.faults.processes import PrivateRedis, WebProcess, web_process
from tests.keys import api_key
from tests.servers import process_env
from tests.waiting import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

TICK_SECONDS = 0.2  # one call of each kind per tick
OUTAGE_TICKS = 50  # 10 s of each fault (issue 14)
CALM_TICKS = 10
REDIS_TIMEOUT_SECONDS = 1.0  # the proxy's socket timeout (broker/infra/redis.py)
# A frozen Redis is noticed by the first call, or backstop read, that times out on it.
NOTICED_WITHIN_SECONDS = 2 * REDIS_TIMEOUT_SECONDS


def revoke_in_thread(issued: IssuedToken) -> None:
    """From another thread, as an admin's request would: announcing it may block on the
    frozen Redis, and the load must go on meanwhile."""
    try:
        token_revoke(token=Token.objects.get(pk=issued.token.pk))
    finally:
        connection.close()


class Load:
    """One call of each kind every tick, from a pool of threads; the answers kept."""

    def __init__(self, kinds: dict[str, Callable[[], Answer]]) -> None:
        self.kinds = kinds
        self.pool = ThreadPoolExecutor(max_workers=48)
        self.futures: list[Future[Answer]] = []
        self.next_tick = time.monotonic()

    def run(self, ticks: int) -> None:
        self.next_tick = max(self.next_tick, time.monotonic())  # no burst to catch up
        for _ in range(ticks):
            self.futures += [self.pool.submit(kind) for kind in self.kinds.values()]
            self.next_tick += TICK_SECONDS
            time.sleep(max(0.0, self.next_tick - time.monotonic()))  # the load's pace

    def answers(self) -> list[Answer]:
        self.pool.shutdown(wait=True)
        return [future.result() for future in self.futures]


@pytest.fixture
def processes(
    private_redis: PrivateRedis, settings: Any, fake_anthropic: FakeAnthropic
) -> Iterator[tuple[WebProcess, WebProcess]]:
    """Two web processes on the private Redis: one as shipped (limits fail closed), one
    with KEYBROKER_POLICY_FAIL_OPEN."""
    settings.REDIS_URL = private_redis.url  # this process announces revocations there too
    with (
        web_process(process_env()) as closed,
        web_process(process_env(KEYBROKER_POLICY_FAIL_OPEN="1")) as open_,
    ):
        yield closed, open_


def in_window(answer: Answer, window: tuple[float, float]) -> bool:
    return window[0] <= answer.started and answer.ended <= window[1]


def test_redis_down_then_frozen_under_load(
    processes: tuple[WebProcess, WebProcess],
    private_redis: PrivateRedis,
    fake_anthropic: FakeAnthropic,
    alice: AbstractBaseUser,
    figures: Figures,
) -> None:
    closed, open_ = processes
    key = api_key(tail="R3ds")
    fake_anthropic.valid_keys.add(key)
    backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    free = agent_token("free", alice)
    limited = agent_token("limited", alice, rpm=100_000)
    revoked_while_down = agent_token("revoked-down", alice)
    revoked_while_frozen = agent_token("revoked-frozen", alice)
    load = Load(
        {
            "free": lambda: call(closed.url, free.plaintext, "free"),
            "limited": lambda: call(closed.url, limited.plaintext, "limited"),
            "limited-fail-open": lambda: call(open_.url, limited.plaintext, "limited-fail-open"),
        }
    )
    probes: list[Answer] = []

    def probe(token: IssuedToken, kind: str) -> None:
        probes.extend(call(web.url, token.plaintext, kind) for web in (closed, open_))

    # Both tokens cached in both processes before anything breaks.
    probe(revoked_while_down, "warm")
    probe(revoked_while_frozen, "warm")
    load.run(CALM_TICKS)

    private_redis.stop()
    down = time.monotonic()
    load.run(OUTAGE_TICKS // 2)
    revoke_in_thread(revoked_while_down)  # fails fast to announce: nothing listens
    load.run(OUTAGE_TICKS - OUTAGE_TICKS // 2)
    up = time.monotonic()
    private_redis.start()
    back_up = time.monotonic()
    probe(revoked_while_down, "after-down")
    load.run(CALM_TICKS)

    private_redis.freeze()
    frozen = time.monotonic()
    load.run(OUTAGE_TICKS // 2)
    revoking = threading.Thread(target=revoke_in_thread, args=[revoked_while_frozen])
    revoking.start()
    load.run(OUTAGE_TICKS - OUTAGE_TICKS // 2)
    thawed = time.monotonic()
    private_redis.thaw()
    back_thawed = time.monotonic()
    revoking.join(timeout=10)
    probe(revoked_while_frozen, "after-frozen")
    load.run(CALM_TICKS)
    answers = load.answers()

    # Every call was answered, and in bounded time: nothing hung on the dead Redis.
    slow = [a for a in answers + probes if a.status == 0 or a.seconds > ANSWER_BOUND_SECONDS]
    assert slow == []
    # Once a process has seen Redis stop answering (a call's or its listener's first
    # timeout, within about a second), its calls skip Redis: only calls that began before
    # then waited out the 1 s socket timeout; none does afterwards.
    waited = [
        a for a in answers if frozen <= a.started < thawed and a.seconds >= REDIS_TIMEOUT_SECONDS
    ]
    late = [a for a in waited if a.started >= frozen + NOTICED_WITHIN_SECONDS]
    assert late == [], [(round(a.started - frozen, 2), round(a.seconds, 2), a.kind) for a in late]
    # Calls that need no Redis kept working from the database throughout.
    assert {a.status for a in answers if a.kind == "free"} == {200}
    assert {a.status for a in answers if a.kind == "limited-fail-open"} == {200}
    # Limited calls that ran inside an outage were refused with a clear 503, the others
    # went through (a call that straddles the fault's edge may be either).
    limited_answers = [a for a in answers if a.kind == "limited"]
    inside = [
        a for a in limited_answers if any(in_window(a, w) for w in [(down, up), (frozen, thawed)])
    ]
    # A second after Redis is back, its clients have reconnected.
    clear = [
        a
        for a in limited_answers
        if all(
            a.ended < start or a.started > end + 1
            for start, end in [(down, back_up), (frozen, back_thawed)]
        )
    ]
    assert len(inside) >= OUTAGE_TICKS // 2  # so that the next line cannot pass vacuously
    assert len(clear) >= CALM_TICKS
    assert {(a.status, a.message[:19]) for a in inside} == {(503, "policy unavailable:")}
    assert {a.status for a in clear} == {200}, [
        (round(a.started - down, 2), round(a.seconds, 2), a.status, a.message)
        for a in clear
        if a.status != 200
    ] + [round(t - down, 2) for t in (up, back_up, frozen, thawed, back_thawed)]
    # A token revoked during either outage is refused by both processes once it is over.
    assert [(p.kind, p.status) for p in probes if p.kind.startswith("after")] == [
        ("after-down", 401), ("after-down", 401), ("after-frozen", 401), ("after-frozen", 401),
    ]  # fmt: skip
    assert {p.message for p in probes if p.kind.startswith("after")} == {"token revoked"}

    # Every call is in the audit trail once: none lost, none twice.
    sent = len(answers) + len(probes)
    calls = AuditEvent.objects.filter(action__in=["proxy.request", "policy.denied"])
    wait_until(
        lambda: calls.count() >= sent,
        timeout=20,
        what=lambda: f"{sent} audit events (there are {calls.count()})",
    )
    assert calls.count() == sent
    refused = [a for a in answers if a.status == 503]
    assert calls.filter(status=503, action="policy.denied").count() == len(refused)

    figures.add(
        Figure(
            case="Redis down, then frozen (SIGSTOP), under load",
            load=f"{sent} calls over {len(answers) // 3 * TICK_SECONDS:.0f} s, 2 web processes",
            faults=f"Redis stopped {OUTAGE_TICKS * TICK_SECONDS:.0f} s, then frozen "
            f"{OUTAGE_TICKS * TICK_SECONDS:.0f} s; a token revoked during each",
            refused=f"{len(refused)} limited calls (503, fail closed); 0 with fail-open",
            lost=sent - calls.count(),
            holds=f"no call over 5 s; {len(waited)} calls waited out the frozen Redis's "
            f"timeout, none {NOTICED_WITHIN_SECONDS:.0f} s into the freeze; grants without rates "
            "all 200; both revocations refused (401) at once after",
        )
    )


IDLE_FAULTS = ["stopped", "frozen", "cut"]


@pytest.mark.parametrize("fault", IDLE_FAULTS)
def test_a_token_revoked_during_an_outage_is_refused_by_a_process_that_was_idle(
    fault: str,
    private_redis: PrivateRedis,
    settings: Any,
    fake_anthropic: FakeAnthropic,
    alice: AbstractBaseUser,
    figures: Figures,
) -> None:
    """No call reached this process during the outage, so nothing made it drop its cache:
    once Redis answers again, only the access generation can tell it.

    Stopped: the restarted Redis (which keeps no keys) has lost the generation too, so it
    reads as changed. Frozen: the announcement waits in the socket and lands at SIGCONT.
    Cut (new connections refused, keys and open connections kept, as behind a partition
    between the admin's process and Redis): the announcement is lost, and the process finds
    the change in the database's copy of the generation, which the revocation waited for.
    """
    settings.REDIS_URL = private_redis.url
    key = api_key(tail="1dle")
    fake_anthropic.valid_keys.add(key)
    backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    token = agent_token("idle", alice)
    plaintext = token.plaintext
    with web_process(process_env()) as web:
        assert call(web.url, plaintext, "warm").status == 200
        if fault == "cut":
            redis_client().connection_pool.disconnect()  # this process must connect anew
            private_redis.cut()
        else:
            getattr(private_redis, "freeze" if fault == "frozen" else "stop")()
        revoke_in_thread(token)
        if fault == "cut":
            private_redis.heal()
        else:
            getattr(private_redis, "thaw" if fault == "frozen" else "start")()
        after = call(web.url, plaintext, "after")
    calls = AuditEvent.objects.filter(action="proxy.request")
    wait_until(lambda: calls.count() >= 2, timeout=10, what="both calls' audit events")
    figures.add(
        Figure(
            case=f"A token revoked while Redis is {fault}; the proxy process idle meanwhile",
            load="1 call before, 1 after",
            faults={
                "stopped": "Redis stopped (SIGTERM) and started again",
                "frozen": "Redis frozen (SIGSTOP) and thawed",
                "cut": "new connections to Redis refused, open ones kept",
            }[fault],
            refused=f"the call after: {after.status}",
            lost=2 - calls.count(),
            holds="refused on the next request" if after.status == 401 else "**gap**",
        )
    )
    assert (after.status, after.message) == (401, "token revoked")
