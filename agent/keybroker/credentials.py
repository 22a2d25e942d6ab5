"""Tokens that renew themselves: a shared, locked cache of ``crd_`` tokens, and credentials
providers for the official ``anthropic`` SDK built on it.

A ``crd_`` token lives one minute to one hour; a Claude Code session or an agent run lasts
longer. Every process of one agent (one config file) shares one cache file beside the config,
``tokens.json``, private to its owner (0600 in the 0700 config directory). A process that
needs a token takes an exclusive lock on ``tokens.lock``, reads the cache, and mints through
the agent's vend token only when the cached token is about to expire (or was rejected), so
several processes renewing at once mint one token between them.

When to renew: once less than ``max(30 s, 20 % of the TTL)`` is left (but never more than
half of it): a 1-minute token is used for 30 s, a 15-minute one for 12 minutes, an hour's for
48 minutes. 30 s is also when the SDK's own cache insists on a fresh token; 20 % leaves a
long token room for a server that is briefly away. docs/decisions.md has the reasoning.

``anthropic`` is an optional extra (``pip install 'keybroker[anthropic]'``): it is imported
only when a provider hands the SDK a token, never when ``keybroker`` is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keybroker.cli import (
    CACHE_FILE,
    CACHE_LOCK_FILE,
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    CliError,
    Config,
    Server,
    config_path,
    expect,
    mint,
    require_config,
    write_private,
)
from keybroker.wire import duration_parse

if TYPE_CHECKING:
    from anthropic.lib.credentials import AccessToken

MIN_RENEW_SECONDS = 30.0
RENEW_FRACTION = 0.2
# A mint that fails while the cached token still has this long left serves the cached one.
STILL_USABLE_SECONDS = 5.0

Clock = Callable[[], float]


class CredentialsError(Exception):
    """No token could be had: not enrolled, not approved, the server away, ... ``code`` is the
    CLI's exit code for the same failure (docs/agent-cli.md)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CachedToken:
    token: str
    id: str
    backend: str
    base_url: str
    ttl: int
    expires: float  # on this machine's clock: when it was asked for plus its TTL, never later
    # Whose it is: a config re-enrolled as another agent, or at another server, starts afresh.
    agent_id: str
    url: str

    def renew_at(self) -> float:
        return self.expires - renew_margin(self.ttl)


def renew_margin(ttl: float) -> float:
    return min(max(MIN_RENEW_SECONDS, RENEW_FRACTION * ttl), ttl / 2)


def cache_key(backend: str, ttl: str | None) -> str:
    """Tokens asked for with another TTL are not shared: an agent that wants 1-minute tokens
    must not be handed a 1-hour one another process minted."""
    if ttl is None:
        return f"{backend} default"
    try:
        return f"{backend} {duration_parse(ttl, whole=False):g}s"
    except ValueError:
        return f"{backend} {ttl}"  # the server names what is wrong with it


class TokenStore:
    """The cache file of one config, and the lock that serializes its writers."""

    def __init__(self, config_file: Path, *, clock: Clock = time.time) -> None:
        self.config_file = config_file
        self.path = config_file.parent / CACHE_FILE
        self.clock = clock
        # flock is per open file: threads of one process take this lock first.
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(CACHE_LOCK_FILE)
        with self._thread_lock:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise CredentialsError(f"cannot open {lock_path} ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    def read(self) -> dict[str, CachedToken]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            entries = raw["tokens"]
            return {key: CachedToken(**value) for key, value in entries.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}  # unreadable: start afresh, it only holds tokens that can be minted again

    def write(self, entries: dict[str, CachedToken]) -> None:
        now = self.clock()
        alive = {key: asdict(entry) for key, entry in entries.items() if entry.expires > now}
        write_private(self.path, json.dumps({"tokens": alive}, indent=2) + "\n", prefix=".tokens-")

    def token(
        self,
        backend: str,
        ttl: str | None,
        *,
        rejected: str | None = None,
        live: Callable[[Config, CachedToken], bool] | None = None,
    ) -> CachedToken:
        """A token with time left: the cached one, or a new one minted (and cached).

        ``rejected`` is a token the upstream refused (a 401): never served again, although
        a different token another process cached meanwhile is. ``live`` may ask the server
        whether the cached token still works (revoked early?) before it is served.
        """
        key = cache_key(backend, ttl)
        config = _config(self.config_file)  # not enrolled: said before any lock is tried
        with self.locked():
            entries = self.read()
            cached = entries.get(key)
            if cached is not None and (
                cached.agent_id != str(config.agent_id) or cached.url != config.url
            ):
                cached = None
            if cached is not None and cached.token == rejected:
                cached = None
            if cached is not None and self.clock() < cached.renew_at():
                if live is None or live(config, cached):
                    return cached
                cached = None  # revoked early: never a fallback
            asked = self.clock()
            try:
                data = mint(config, backend, ttl)
            except CliError as exc:
                if (
                    cached is not None
                    and exc.code in (EXIT_UNREACHABLE, EXIT_ERROR)
                    and cached.expires - self.clock() > STILL_USABLE_SECONDS
                ):
                    # Renewing early failed (server briefly away): the token still works.
                    return cached
                raise CredentialsError(exc.message, exc.code) from None
            fresh = _cached_from(data, backend, asked, config)
            entries[key] = fresh
            try:
                self.write(entries)
            except CliError as exc:
                raise CredentialsError(exc.message, exc.code) from None
            return fresh


def _config(path: Path) -> Config:
    try:
        return require_config(path)
    except CliError as exc:
        raise CredentialsError(exc.message, exc.code) from None


def _cached_from(data: dict[str, Any], backend: str, asked: float, config: Config) -> CachedToken:
    ttl = data.get("ttl")
    if not isinstance(ttl, int) or ttl <= 0:
        raise CredentialsError("the server's credential answer has no ttl")
    return CachedToken(
        token=data["token"],
        id=str(data.get("id", "")),
        backend=backend,
        base_url=data["base_url"],
        ttl=ttl,
        # From when it was asked for, not when the answer came: never later than the server's
        # expiry, whatever the two clocks say.
        expires=asked + ttl,
        agent_id=str(config.agent_id),
        url=config.url,
    )


def token_is_live(config: Config, cached: CachedToken) -> bool:
    """Whether the server still lists ``cached`` among the agent's live tokens (an admin or
    ``keybroker revoke`` may have ended it early). Unsure (server away) counts as live: it
    has time left, and the upstream's 401 is the final word."""
    try:
        with Server(config.url, config.vend_token) as server:
            rows = expect(server.request("GET", "/v1/active"), 200)
    except CliError:
        return True
    if not isinstance(rows, list):
        return True
    return any(isinstance(row, dict) and str(row.get("id")) == cached.id for row in rows)


class _Provider:
    """What the sync and async providers share: the cache, and the token served last."""

    def __init__(
        self,
        backend: str = "anthropic",
        *,
        ttl: str | None = None,
        config: str | os.PathLike[str] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.backend = backend
        self.ttl = ttl
        self.store = TokenStore(config_path(os.fspath(config) if config else None), clock=clock)
        self._served: str | None = None

    @property
    def base_url(self) -> str:
        """The proxy URL for this backend (asks for a token if none is cached yet)."""
        return self.current().base_url

    def current(self, *, force_refresh: bool = False) -> CachedToken:
        # force_refresh follows a 401 for the token this provider served last.
        rejected = self._served if force_refresh else None
        cached = self.store.token(self.backend, self.ttl, rejected=rejected)
        self._served = cached.token
        return cached

    def _access_token(self, cached: CachedToken) -> AccessToken:
        return _access_token(cached.expires - self.store.clock(), cached.token)

    def __repr__(self) -> str:
        return f"keybroker.{type(self).__name__}({self.backend!r}, ttl={self.ttl!r})"


class Credentials(_Provider):
    """A credentials provider for ``anthropic.Anthropic(credentials=...)``.

    ``keybroker.Credentials("anthropic", ttl="15m")`` mints through the agent's vend token
    (its keybroker config), renews before expiry, and after a 401 (``force_refresh``) mints
    anew instead of serving the refused token. ``.base_url`` is what the SDK needs::

        creds = keybroker.Credentials("anthropic", ttl="15m")
        client = anthropic.Anthropic(base_url=creds.base_url, credentials=creds)
    """

    def __call__(self, *, force_refresh: bool = False) -> AccessToken:
        return self._access_token(self.current(force_refresh=force_refresh))


class AsyncCredentials(_Provider):
    """The async twin, for ``anthropic.AsyncAnthropic(credentials=...)``: the same cache and
    rules; the lock and the mint run in a worker thread so the event loop never waits."""

    async def __call__(self, *, force_refresh: bool = False) -> AccessToken:
        cached = await asyncio.to_thread(self.current, force_refresh=force_refresh)
        return self._access_token(cached)


def _access_token(left: float, token: str) -> AccessToken:
    try:
        from anthropic.lib.credentials import AccessToken
    except ImportError:  # pragma: no cover - the extra is installed wherever the SDK runs
        raise CredentialsError(
            "the anthropic SDK (2.12 or later) is not installed: pip install 'keybroker[anthropic]'"
        ) from None
    # The SDK compares expires_at with the wall clock: it is told how long the token has left
    # (by the provider's clock) from now. It asks again as the end nears; when to renew is ours.
    return AccessToken(token=token, expires_at=int(time.time() + max(left, 1)))


__all__ = ["AsyncCredentials", "CachedToken", "Credentials", "CredentialsError", "TokenStore"]
