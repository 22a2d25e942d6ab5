"""Which key of a backend's pool a call goes out with (issue 15), and what an answer says
about that key.

Selection is weighted among the healthy keys: enabled (the Route holds only those), not
known invalid, and not cooling down. A key that answers 429 or 529 cools down for the time
the upstream asked (``retry-after``) or an exponential backoff; one that answers 500, 502,
503 or 504, or whose call never reached the upstream (refused, reset, connect timeout),
cools down for a shorter backoff (docs/decisions.md, Key pools). The cooldown lives in
Redis, so every process on every machine skips the key, and it expires by itself. A key
that answers 401 is marked unhealthy the same way and its validation is queued, which
records whether it is really invalid. A backend with one key never asks Redis: there is
nothing to choose between, and the upstream's answer goes to the client as it always did.

Each process also remembers the cooldowns it set itself, so while Redis cannot be read or
written (down, or too slow: its breaker is open) the process that saw a key fail still
skips it; only what other processes learnt meanwhile is unknown to it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
from celery import signature

from broker.infra.db import db_call
from broker.infra.redis import async_redis_client, redis_breaker, redis_key
from broker.kinds import AuthScheme
from broker.selectors.backend_keys import LAST_ERROR_SECONDS, key_cooldown_name, key_error_name
from broker.services.backends import VALIDATE_TASK

logger = logging.getLogger(__name__)

# Answers that say "not this key, not now": rate limited, overloaded, not authenticated.
COOL_STATUSES = frozenset({429, 529})
REJECTED_STATUSES = frozenset({401})
BACKOFF_FIRST_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0
# An upstream's own failure: usually one request's or one server's, seldom the key's, so
# the key is set aside briefly (long enough that a key failing every call stops costing
# each call a second round trip, short enough that a blip moves little load).
SERVER_ERROR_STATUSES = frozenset({500, 502, 503, 504})
SERVER_ERROR_FIRST_SECONDS = 1.0
SERVER_ERROR_MAX_SECONDS = 30.0
FAILOVER_STATUSES = COOL_STATUSES | SERVER_ERROR_STATUSES | REJECTED_STATUSES
# A 401 keeps the key out until its validation (queued at once) has had time to say more.
REJECTED_SECONDS = 60.0
# Consecutive cooldowns of a key within this long double its backoff.
STRIKES_WINDOW_SECONDS = 600


# (backend, the key's secret) -> when the cooldown this process set ends, in time.time().
# By secret, not fingerprint: a fingerprint shows only the key's last four characters.
_cooling_here: dict[tuple[str, str], float] = {}


def _remember_cooldown(backend: str, key: RouteKey, until: float) -> None:
    now = time.time()
    for name in [name for name, end in _cooling_here.items() if end <= now]:
        _cooling_here.pop(name, None)
    _cooling_here[(backend, key.secret)] = until


@dataclass(frozen=True)
class RouteKey:
    """One enabled key of a pool, as the proxy holds it. Never log or render ``secret``."""

    id: int
    backend_id: int
    fingerprint: str
    scheme: AuthScheme
    secret: str = field(repr=False)
    weight: int = 1
    invalid: bool = False  # its last validation said so


def _strikes_key(backend: str, fingerprint: str) -> str:
    return redis_key("keystrikes", backend, fingerprint)


def retry_after_seconds(value: str) -> float | None:
    """``retry-after`` in seconds (Anthropic sends whole seconds); None when absent or a
    date, which an upstream under load does not send."""
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


async def key_choose(
    backend: str, keys: Sequence[RouteKey], *, exclude: Sequence[RouteKey] = ()
) -> RouteKey | None:
    """A key for the next attempt: weighted among the healthy ones not in ``exclude``.

    With none healthy, the key whose cooldown ends first (so the client gets the upstream's
    own answer); None only when every key is excluded."""
    candidates = [key for key in keys if key not in exclude]
    if not candidates:
        return None
    if len(keys) == 1:
        return candidates[0]
    try:
        redis_breaker().check()
        ends = await async_redis_client().mget(
            [key_cooldown_name(backend, key.fingerprint) for key in candidates]
        )
        until = [float(end) if end is not None else 0.0 for end in ends]
    except (redis.RedisError, OSError) as exc:
        redis_breaker().trip_on(exc)
        logger.warning(
            "proxy cannot read key cooldowns of %s; skipping only those it set itself", backend
        )
        # Redis says nothing now: what this process set itself still holds.
        until = [_cooling_here.get((backend, key.secret), 0.0) for key in candidates]
    now = time.time()
    healthy = [
        key for key, end in zip(candidates, until, strict=True) if end <= now and not key.invalid
    ]
    if not healthy:
        # Everything cooling (or invalid): the soonest back; with exclusions, no retry.
        if exclude:
            return None
        return min(zip(candidates, until, strict=True), key=lambda pair: pair[1])[0]
    return random.choices(healthy, weights=[key.weight for key in healthy])[0]  # noqa: S311


def cooldown_seconds(*, status: int | None, retry_after: str, strikes: int) -> float:
    """How long a key stays out after this answer (``status``; None: the upstream was not
    reached), its ``strikes``-th cooldown in a row."""
    if status in REJECTED_STATUSES:
        return REJECTED_SECONDS
    if status in COOL_STATUSES:
        first, longest = BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS
    else:
        first, longest = SERVER_ERROR_FIRST_SECONDS, SERVER_ERROR_MAX_SECONDS
    asked = retry_after_seconds(retry_after) if status is not None else None
    if asked is not None:
        return min(max(asked, 1.0), longest)
    return min(first * 2.0 ** (strikes - 1), longest)


async def key_cool(
    backend: str, key: RouteKey, *, status: int | None, retry_after: str = "", error: str = ""
) -> float:
    """Keep ``key`` out of every process' choice for as long as the upstream asked, or a
    backoff that doubles with each cooldown in a row; returns the seconds. ``status`` None
    is a call that never reached the upstream, ``error`` says why."""
    client = async_redis_client()
    try:
        redis_breaker().check()
        counting = client.pipeline(transaction=False)
        counting.incr(_strikes_key(backend, key.fingerprint))
        counting.expire(_strikes_key(backend, key.fingerprint), STRIKES_WINDOW_SECONDS)
        strikes = int((await counting.execute())[0])
        seconds = cooldown_seconds(status=status, retry_after=retry_after, strikes=strikes)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        marking = client.pipeline(transaction=False)
        marking.set(
            key_cooldown_name(backend, key.fingerprint),
            f"{time.time() + seconds:.3f}",
            px=max(1, int(seconds * 1000)),
        )
        marking.set(
            key_error_name(backend, key.fingerprint),
            f"{status if status is not None else error} at {stamp}",
            ex=LAST_ERROR_SECONDS,
        )
        await marking.execute()
    except (redis.RedisError, OSError) as exc:
        redis_breaker().trip_on(exc)
        logger.warning(
            "proxy cannot record the cooldown of a key of %s; only this process skips it",
            backend,
        )
        # The strikes before this one are in Redis: back off as for a first.
        seconds = cooldown_seconds(status=status, retry_after=retry_after, strikes=1)
    _remember_cooldown(backend, key, time.time() + seconds)
    return seconds


def _queue_validation(backend_id: int, key_id: int) -> None:
    signature(VALIDATE_TASK, args=(backend_id, key_id)).delay()


_queue_validation_async = db_call(_queue_validation)


async def key_rejected(backend: str, key: RouteKey) -> None:
    """The upstream refused ``key`` (401): out of the choice for a while, and validated now
    so its state says whether it is really invalid."""
    await key_cool(backend, key, status=401, retry_after="")
    try:
        await _queue_validation_async(key.backend_id, key.id)
    except Exception as exc:  # the call goes on; the scheduled validation will see it
        logger.warning("cannot queue the validation of a key of %s (%s)", backend, exc)
