"""The access token of a federated backend, as the proxy's hot path needs it: from memory.

Each process (and event loop) keeps the token it last got and uses it until it is due for a
refresh, so a busy backend costs nothing per request. A refresh is single-flight: the first
request that finds the token stale starts one exchange (in a worker thread, through the
shared Redis cache and lock of broker/services/federation.py) and every request arriving
meanwhile awaits that same one. A failed exchange is remembered for a few seconds so a
broken federation setting is not retried by every request; a token that failed to refresh
but has not expired yet keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from broker.infra.db import db_call
from broker.infra.loops import LoopLocal
from broker.kinds import OAUTH_BEARER, AuthScheme
from broker.services import federation as service
from broker.services.federation import FederatedToken, Federation, FederationError
from proxy.errors import UpstreamFailed

logger = logging.getLogger(__name__)

FAILURE_COOLDOWN_SECONDS = 5.0

_federation_token = db_call(service.federation_token)
_federation_forget = db_call(service.federation_forget)


class FederationCache:
    def __init__(self) -> None:
        self._tokens: dict[str, FederatedToken] = {}
        self._flights: dict[str, asyncio.Future[FederatedToken]] = {}
        self._failures: dict[str, tuple[float, FederationError]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # A refused token being dropped from the shared cache, by cache key: the next
        # exchange waits for it, or it could be handed the same token back from there.
        self._forgetting: dict[str, asyncio.Task[Any]] = {}

    async def token(self, federation: Federation) -> str:
        key = federation.cache_key
        held = self._tokens.get(key)
        if held is not None and held.fresh(service.clock()):
            return held.token
        try:
            return (await self._refreshed(federation)).token
        except FederationError:
            # An upstream token endpoint that is down must not take the backend down while
            # the token in hand is still good.
            if held is not None and held.usable(service.clock()):
                logger.warning(
                    "backend %s: refreshing its access token failed; using the current one",
                    federation.backend,
                )
                return held.token
            raise

    async def _refreshed(self, federation: Federation) -> FederatedToken:
        key = federation.cache_key
        flight = self._flights.get(key)
        if flight is None:
            failure = self._failures.get(key)
            if failure is not None and failure[0] > time.monotonic():
                raise failure[1]
            flight = asyncio.ensure_future(self._exchange(federation))
            # Nobody may be left to await a failed flight (all its callers hung up).
            flight.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._flights[key] = flight
        # Shielded: a client that hangs up must not cancel the exchange the others await.
        return await asyncio.shield(flight)

    async def _exchange(self, federation: Federation) -> FederatedToken:
        key = federation.cache_key
        try:
            forgetting = self._forgetting.get(key)
            if forgetting is not None:
                await asyncio.wait({forgetting})
            token = await _federation_token(federation)
        except FederationError as exc:
            self._failures[key] = (time.monotonic() + FAILURE_COOLDOWN_SECONDS, exc)
            raise
        finally:
            self._flights.pop(key, None)
        self._tokens[key] = token
        self._failures.pop(key, None)
        return token

    def forget(self, federation: Federation, token: str) -> None:
        """The upstream answered 401 to ``token``: the next call exchanges anew."""
        key = federation.cache_key
        held = self._tokens.get(key)
        if held is not None and held.token == token:
            del self._tokens[key]
        task = asyncio.ensure_future(_federation_forget(federation, token))
        self._background.add(task)
        self._forgetting[key] = task

        def done(finished: asyncio.Task[Any]) -> None:
            if not finished.cancelled():
                finished.exception()  # logged by the service; retrieved here
            self._background.discard(finished)
            if self._forgetting.get(key) is finished:
                del self._forgetting[key]

        task.add_done_callback(done)


_caches = LoopLocal(FederationCache)


def federation_cache() -> FederationCache:
    return _caches.get()


async def federated_secret(federation: Federation) -> tuple[AuthScheme, str]:
    """What a federated backend's calls carry upstream: the access token, as a Bearer with
    the OAuth beta flag. Refusals use the proxy's own error shape and name the backend."""
    try:
        token = await federation_cache().token(federation)
    except FederationError as exc:
        raise UpstreamFailed(
            f"backend {federation.backend}: {exc.message}", timed_out=exc.timed_out
        ) from None
    return OAUTH_BEARER, token
