"""Who may call through the proxy, answered from memory when it safely can.

A token seen recently is checked without the database or Redis. Any revocation,
unenrollment, backend change or rotation sets a new access generation in Redis and
publishes it (broker/services/access.py); each process listens, drops its cache when news
comes and confirms it, and the change waits for those confirmations before it answers. So
a revoked token is refused on the very next request everywhere, with no Redis round trip
per request. While a process is not listening (starting, or Redis unreachable), it reads
the generation for each request instead, sent after the request arrived (requests arriving
while a read is on its way share the next one), and a process that cannot read it asks the
database. Expiry is checked against the clock on every request whatever the cache holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from django.conf import settings
from django.utils import timezone

from broker.infra.db import db_call
from broker.infra.redis import async_redis_client, redis_breaker, redis_key
from broker.kinds import SCHEMES, AuthScheme
from broker.models import (
    LAST_USED_RESOLUTION,
    Backend,
    Grant,
    Token,
    TokenState,
    ValidationState,
    touch_last_used,
)
from broker.services.access import (
    ACCESS_ACK,
    ACCESS_CHANNEL,
    ACCESS_GENERATION,
    ACK_KEEP_SECONDS,
    GENERATION_CHECK_SECONDS,
    Refusal,
    agent_refusal,
    recorded_generation,
    refusal,
    token_refusal,
    token_unknown,
)
from broker.services.federation import Federation, federation_of
from broker.services.policy import Policy, grant_policy
from keybroker.wire import PROXY_PREFIX
from proxy.errors import ProxyError
from proxy.keys import RouteKey

logger = logging.getLogger(__name__)

CACHE_SIZE = 10_000
# A first gate in memory, so a busy token costs no query; touch_last_used is the rule.
LAST_USED_RESOLUTION_SECONDS = LAST_USED_RESOLUTION.total_seconds()
# While calls are open, how often each process looks for a change that withdraws them.
WATCH_INTERVAL_SECONDS = 0.25
# While listening, the generation is still read after this long without news: a backstop
# for news that never came, and how a frozen Redis is noticed.
LISTEN_CHECK_SECONDS = GENERATION_CHECK_SECONDS
LISTEN_RETRY_SECONDS = 0.5


class AccessDenied(ProxyError):
    """keybroker will not take this call: a missing or dead credential (401), a call the
    token may not make (403) or whose backend is gone (404), or one over a limit (429, or
    503 while the process holds too many request bodies)."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(status, error_type, message, headers=headers)
        # Set once the token is known, so the refusal's audit event names the agent.
        self.access: TokenAccess | None = None

    @property
    def outcome(self) -> str:
        return "denied"

    @property
    def action(self) -> str:
        # Not allowed or over a limit: policy said no. A bad credential is a refused call.
        return "policy.denied" if self.status in (403, 429) else "proxy.request"


@dataclass(frozen=True)
class TokenAccess:
    """What a crd_ token gives access to (its agent, backend and policy), as of the moment
    it was read."""

    token_id: str
    token_prefix: str
    agent_id: str
    agent_name: str
    agent_status: str
    backend: str
    expires_at: datetime
    revoked: bool
    has_grant: bool
    # The grant's effective policy, read with the token so enforcement needs no database.
    policy: Policy | None = None


@dataclass(frozen=True)
class Route:
    """A backend as the proxy needs it. Holds the secret: never log or render it."""

    name: str
    kind: str
    base_url: str
    enabled: bool
    scheme: AuthScheme | None
    client_key: bool
    secret: str = field(repr=False)
    # Set for a workload identity backend: calls carry an exchanged access token instead.
    federation: Federation | None = None
    # The enabled keys of its pool, in order (``secret`` is the first one's); empty for a
    # client-key or workload identity backend.
    keys: tuple[RouteKey, ...] = ()


def _read_token(digest: str) -> TokenAccess | None:
    token = Token.objects.select_related("agent").filter(digest=digest).first()
    if token is None:
        return None
    grant = (
        Grant.objects.select_related("backend")
        .filter(agent_id=token.agent_id, backend_id=token.backend_id)
        .first()
    )
    return TokenAccess(
        token_id=str(token.pk),
        token_prefix=token.display_prefix,
        agent_id=str(token.agent_id),
        agent_name=token.agent.name,
        agent_status=token.agent.status,
        backend=Backend.objects.values_list("name", flat=True).get(pk=token.backend_id),
        expires_at=token.expires_at,
        revoked=token.revoked_at is not None,
        has_grant=grant is not None,
        policy=grant_policy(grant) if grant is not None else None,
    )


def _read_route(name: str) -> Route | None:
    backend = Backend.objects.filter(name=name).first()
    if backend is None:
        return None
    keys = tuple(
        RouteKey(
            id=key.pk,
            backend_id=backend.pk,
            fingerprint=key.fingerprint,
            scheme=SCHEMES[key.auth_scheme],
            secret=key.secret,
            weight=key.weight,
            invalid=key.validation_state == ValidationState.INVALID,
        )
        for key in backend.keys.filter(enabled=True)
        if key.auth_scheme in SCHEMES
    )
    return Route(
        name=backend.name,
        kind=backend.kind,
        base_url=backend.base_url,
        enabled=backend.enabled,
        scheme=SCHEMES.get(backend.auth_scheme),
        client_key=backend.client_key,
        secret=keys[0].secret if keys else "",
        keys=keys,
        federation=federation_of(backend),
    )


def _withdrawn(digest: str, backend: str) -> str:
    """Why an open call of this token may no longer go on; empty when it may."""
    access = _read_token(digest)
    if access is None:
        return "token deleted"
    if access.revoked:
        return refusal(TokenState.REVOKED).message
    refused = agent_refusal(name=access.agent_name, status=access.agent_status)
    if refused is not None:
        return refused.message
    if not access.has_grant:
        return f"agent {access.agent_name} has no grant for {backend}"
    if not Backend.objects.filter(name=backend, enabled=True).exists():
        return f"backend {backend} is disabled"
    return ""


def _touch(token_id: str) -> None:
    touch_last_used(Token, token_id)


# Database reads run in worker threads, in parallel; the event loop never waits on them.
_read_token_async = db_call(_read_token)
_read_route_async = db_call(_read_route)
_touch_async = db_call(_touch)
_withdrawn_async = db_call(_withdrawn)
_recorded_generation_async = db_call(recorded_generation)
# Equal to no generation read: the next watch looks at every open call.
_UNKNOWN = object()


def _denied(refused: Refusal) -> AccessDenied:
    # The status and wording are the domain's (broker/services/access.py), as the API's are.
    return AccessDenied(refused.status, refused.anthropic_type, refused.message)


class AccessCache:
    """Per process: tokens and routes read from the database, valid for one generation."""

    def __init__(self) -> None:
        self._tokens: OrderedDict[str, tuple[TokenAccess | None, float]] = OrderedDict()
        self._routes: dict[str, tuple[Route | None, float]] = {}
        self._generation: bytes | str | None = None
        self._last_used: dict[str, float] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Open calls by token digest: their backend and the futures that cut them.
        self._open: dict[str, tuple[str, set[asyncio.Future[str]]]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._watched_generation: bytes | str | object | None = None
        self._recorded_generation: str | None = None  # the database's copy, once read
        self._reading = False  # a generation read is on its way to Redis
        self._next_read: asyncio.Future[bool] | None = None  # shared by who arrived since
        self._listener: asyncio.Task[None] | None = None
        # Subscribed to access changes, with the generation read since: no read per request.
        self.listening = False

    async def _trusted(self) -> bool:
        """True when the cache may be trusted for this request: at once while listening,
        otherwise after a generation read (which also starts the listener)."""
        if self.listening:
            return True
        self.listen()
        return await self._fresh()

    def listen(self) -> None:
        """Start following access changes (at startup, or with the first request)."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def _listen(self) -> None:
        """Follow access changes for as long as the event loop runs; after a failure, read
        per request (``_fresh``) until subscribed again."""
        failing = False
        while True:
            pubsub = async_redis_client().pubsub()
            try:
                await pubsub.subscribe(redis_key(ACCESS_CHANNEL))
                # Confirmed before the generation is read, so no change falls in between.
                while await pubsub.get_message(timeout=LISTEN_CHECK_SECONDS) is None:
                    pass
                if not await self._read_generation():
                    raise ConnectionError("cannot read the access generation")
                await self._read_recorded_generation()
                # Whatever was read while not listening could predate a change that was
                # never announced: start afresh.
                self.clear()
                self.listening, failing = True, False
                redis_breaker().close()
                logger.info("proxy follows access changes over Redis")
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_CHECK_SECONDS)
                    if message is None:
                        if not await self._read_generation():
                            raise ConnectionError("cannot read the access generation")
                        await self._read_recorded_generation()
                    elif message["type"] == "message":
                        await self._changed(message["data"])
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                if not failing:
                    logger.warning(
                        "proxy stopped following access changes (%s); asking the database "
                        "until Redis answers again",
                        type(exc).__name__,
                    )
                failing = True
                redis_breaker().trip()  # this loop keeps trying, off the request path
            finally:
                self.listening = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    async def _read_recorded_generation(self) -> None:
        """The database's copy of the generation: it moves without news over Redis when the
        process that made a change could not reach Redis. A database that cannot be read
        leaves the cache as it is (it is what serves calls then)."""
        try:
            recorded = await _recorded_generation_async()
        except Exception as exc:  # whatever the database says, the listener goes on
            logger.debug("access generation unread in the database (%s)", type(exc).__name__)
            return
        if recorded != self._recorded_generation:
            if self._recorded_generation is not None:
                logger.info("proxy saw an access change in the database that Redis never told")
                self.clear()
                self._watched_generation = _UNKNOWN  # open calls are checked again too
            self._recorded_generation = recorded

    async def _changed(self, generation: bytes) -> None:
        self.clear()
        self._generation = generation
        # The change wrote the same value to the database: its copy is not news then.
        self._recorded_generation = generation.decode("ascii", "replace")
        acks = redis_key(ACCESS_ACK, generation.decode("ascii", "replace"))
        confirming = async_redis_client().pipeline(transaction=False)
        confirming.rpush(acks, b"1")
        confirming.expire(acks, ACK_KEEP_SECONDS)
        await confirming.execute()

    async def _fresh(self) -> bool:
        """True when the cache may be trusted for this request.

        A read sent before this request arrived could miss a change committed just before
        it did, so a request arriving while one is on its way waits for the next, which
        every request arriving meanwhile shares: one Redis round trip per wave of requests
        under load rather than one per request (docs/decisions.md, issue 13)."""
        if redis_breaker().open:
            self.clear()  # the generation is unknown: the database says what holds
            return False
        if self._reading:
            if self._next_read is None:
                self._next_read = asyncio.get_running_loop().create_future()
            return await asyncio.shield(self._next_read)
        self._reading = True
        try:
            return await self._read_generation()
        finally:
            self._reading = False
            self._read_for_waiting()

    def _read_for_waiting(self) -> None:
        waiting, self._next_read = self._next_read, None
        if waiting is None:
            return
        self._reading = True

        async def read() -> None:
            try:
                waiting.set_result(await self._read_generation())
            except asyncio.CancelledError:
                waiting.cancel()
                raise
            except Exception as exc:  # the waiting requests fail as the read did
                waiting.set_exception(exc)
            finally:
                self._reading = False
                self._read_for_waiting()

        task = asyncio.ensure_future(read())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read_generation(self) -> bool:
        try:
            generation = await async_redis_client().get(redis_key(ACCESS_GENERATION))
        except (redis.RedisError, OSError) as exc:
            logger.warning("proxy cannot read the access generation; checking the database")
            redis_breaker().trip_on(exc)
            self.clear()
            return False
        if generation != self._generation:
            self.clear()
            self._generation = generation
        return True

    def clear(self) -> None:
        self._tokens.clear()
        self._routes.clear()

    async def token(self, digest: str, *, trusted: bool) -> TokenAccess | None:
        now = time.monotonic()
        max_age = settings.PROXY_CACHE_SECONDS
        if trusted and digest in self._tokens:
            access, read_at = self._tokens[digest]
            if now - read_at < max_age:
                self._tokens.move_to_end(digest)
                return access
        access = await _read_token_async(digest)
        self._tokens[digest] = (access, now)
        if len(self._tokens) > CACHE_SIZE:
            self._tokens.popitem(last=False)
        return access

    async def route(self, name: str, *, trusted: bool) -> Route | None:
        now = time.monotonic()
        if trusted and name in self._routes:
            route, read_at = self._routes[name]
            if now - read_at < settings.PROXY_CACHE_SECONDS:
                return route
        route = await _read_route_async(name)
        self._routes[name] = (route, now)
        return route

    async def withdrawn(self, digest: str, backend: str) -> str:
        """Why a call of this token may no longer go on (revoked, unenrolled, grant removed,
        backend disabled), read from the database; empty when it may. Expiry does not
        count, as for open calls (``watch``)."""
        return await _withdrawn_async(digest, backend)

    def watch(self, digest: str, backend: str) -> asyncio.Future[str]:
        """A future that resolves, with the reason, once the token of an open call is
        revoked, its agent unenrolled, its grant removed or its backend disabled. Expiry
        does not count: a call admitted while its token was valid may finish."""
        withdrawn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._open.setdefault(digest, (backend, set()))[1].add(withdrawn)
        if self._watcher is None or self._watcher.done():
            # From the generation this call was admitted under: a change since is seen.
            self._watched_generation = self._generation
            self._watcher = asyncio.ensure_future(self._watch())
        return withdrawn

    def unwatch(self, digest: str, withdrawn: asyncio.Future[str]) -> None:
        withdrawn.cancel()
        entry = self._open.get(digest)
        if entry is not None:
            entry[1].discard(withdrawn)
            if not entry[1]:
                del self._open[digest]

    async def _watch(self) -> None:
        """Runs while calls are open: one Redis read per interval, and the database only
        when the access generation moved (or cannot be read)."""
        while self._open:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            try:
                redis_breaker().check()
                generation = await async_redis_client().get(redis_key(ACCESS_GENERATION))
            except (redis.RedisError, OSError) as exc:
                redis_breaker().trip_on(exc)
                generation = None  # unknown: ask the database
            else:
                if generation == self._watched_generation:
                    continue
                self._watched_generation = generation
            for digest, (backend, futures) in list(self._open.items()):
                try:
                    reason = await _withdrawn_async(digest, backend)
                except Exception as exc:  # a database hiccup never cuts open calls
                    logger.warning("open calls unchecked (%s)", type(exc).__name__)
                    break
                for withdrawn in list(futures) if reason else ():
                    if not withdrawn.done():
                        withdrawn.set_result(reason)

    def touch(self, token_id: str) -> None:
        """Record use at most once a minute per token, off the request path."""
        now = time.monotonic()
        if now - self._last_used.get(token_id, -LAST_USED_RESOLUTION_SECONDS) < (
            LAST_USED_RESOLUTION_SECONDS
        ):
            return
        self._last_used[token_id] = now
        if len(self._last_used) > CACHE_SIZE:
            self._last_used.clear()
        task = asyncio.ensure_future(_touch_async(token_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def authorize(self, digest: str, backend: str) -> tuple[TokenAccess, Route]:
        """The checks on a crd_ token (by its ``secret_digest``), in order: known, not
        expired, not revoked, agent approved, grant for this backend, backend enabled.
        Each refusal says which."""
        trusted = await self._trusted()
        access = await self.token(digest, trusted=trusted)
        if access is None:
            raise _denied(token_unknown())
        try:
            route = await self._check(access, backend, trusted=trusted)
        except AccessDenied as denied:
            denied.access = access
            raise
        self.touch(access.token_id)
        return access, route

    async def _check(self, access: TokenAccess, backend: str, *, trusted: bool) -> Route:
        refused = token_refusal(
            revoked=access.revoked, expires_at=access.expires_at, now=timezone.now()
        ) or agent_refusal(name=access.agent_name, status=access.agent_status)
        if refused is not None:
            raise _denied(refused)
        if access.backend != backend:
            raise AccessDenied(
                403,
                "permission_error",
                f"this token is for backend {access.backend}, not {backend}; send it to "
                f"{PROXY_PREFIX}{access.backend}/ (the base_url `keybroker get` printed), or "
                f"mint one for {backend} with `keybroker get {backend}`",
            )
        if not access.has_grant:
            raise AccessDenied(
                403, "permission_error", f"agent {access.agent_name} has no grant for {backend}"
            )
        route = await self.route(backend, trusted=trusted)
        if route is None:
            raise AccessDenied(404, "not_found_error", f"no backend named {backend}")
        if not route.enabled:
            raise AccessDenied(403, "permission_error", f"backend {backend} is disabled")
        return route
