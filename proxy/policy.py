"""Policy at the proxy: refuse what a grant does not allow before anything goes upstream,
and count what it uses in Redis, so every process on every machine shares one limit.

Paths, models and the ``max_tokens`` cap are checked in memory, against the policy cached
with the token (proxy/access.py). Rates and budgets live in Redis under
``{prefix}:policy:{grant}:…``:

- ``rpm``: a sliding window log (a sorted set of request times): the N+1st request within
  any window is refused, whatever the clock says, and ``retry-after`` is exact;
- ``tpm:{window}``: tokens of the calls that started in that fixed window;
- ``day:{day}``: tokens of the calls that started on that UTC day.

Windows and days are read from Redis' own clock (``TIME`` inside the scripts), so machines
whose clocks disagree still agree on them. A call is admitted by one Lua script (EVALSHA):
budgets first, then it takes a request slot. A grant with no rate or budget costs no Redis
call at all. When the call ends, its usage (as the proxy read it from the response,
streamed or not) is added to the window and day it started in by a second script, off the
response path. A budget is checked before a call and counted after it, so calls already in
flight when it runs out still finish; the next one is refused.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import secrets
import weakref
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
import redis.asyncio
from django.conf import settings

from broker.redis import redis_client, redis_key
from broker.services.policy import Policy
from proxy.access import AccessDenied

logger = logging.getLogger(__name__)

DAY_SECONDS = 86_400
# Every token the model read or wrote counts, cached or not (as LiteLLM counts them).
COUNTED_USAGE = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
RATE_LIMITED = (429, "rate_limit_error")
FORBIDDEN = (403, "permission_error")

_CLOCK = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window_ms = tonumber(ARGV[2]) * 1000
local window = math.floor(now_ms / window_ms)
local day = math.floor(tonumber(now[1]) / 86400)
local w = string.format('%d', window)
local d = string.format('%d', day)
local window_left = (window + 1) * window_ms - now_ms
local day_left = (day + 1) * 86400000 - now_ms
local base = ARGV[1]
"""

# ARGV: key base, window seconds, rpm, tpm, daily tokens (0 = no limit), a unique id for
# this request. Returns {refusing rule or '', ms until it would pass, window, day, used}.
ADMIT = (
    _CLOCK
    + """
local daily = tonumber(ARGV[5])
if daily > 0 then
  local used = tonumber(redis.call('GET', base .. ':day:' .. d) or '0')
  if used >= daily then return {'daily_tokens', day_left, window, day, used} end
end
local tpm = tonumber(ARGV[4])
if tpm > 0 then
  local used = tonumber(redis.call('GET', base .. ':tpm:' .. w) or '0')
  if used >= tpm then return {'tpm', window_left, window, day, used} end
end
local rpm = tonumber(ARGV[3])
if rpm > 0 then
  local key = base .. ':rpm'
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms - window_ms)
  local count = redis.call('ZCARD', key)
  if count >= rpm then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return {'rpm', tonumber(oldest[2]) + window_ms - now_ms, window, day, count}
  end
  redis.call('ZADD', key, now_ms, ARGV[6])
  redis.call('PEXPIRE', key, window_ms)
end
return {'', 0, window, day, 0}
"""
)

# ARGV: key base, window seconds, window, day, tokens, count in the window (1/0), count in
# the day (1/0). A window or day that is already over is left alone: nobody reads it again.
SETTLE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local tokens = tonumber(ARGV[5])
if ARGV[6] == '1' then
  local window_end = (tonumber(ARGV[3]) + 1) * tonumber(ARGV[2]) * 1000
  if now_ms < window_end then
    local key = ARGV[1] .. ':tpm:' .. ARGV[3]
    redis.call('INCRBY', key, tokens)
    redis.call('PEXPIRE', key, window_end - now_ms + 1000)
  end
end
if ARGV[7] == '1' then
  local day_end = (tonumber(ARGV[4]) + 1) * 86400000
  if now_ms < day_end then
    local key = ARGV[1] .. ':day:' .. ARGV[4]
    redis.call('INCRBY', key, tokens)
    redis.call('PEXPIRE', key, day_end - now_ms + 1000)
  end
end
return 1
"""

# ARGV: key base, window seconds. Returns {requests in the sliding window, tokens in this
# window, tokens today, ms until the oldest request leaves, ms left in window, ms left today}.
READ = (
    _CLOCK
    + """
local key = base .. ':rpm'
local since = '(' .. string.format('%d', now_ms - window_ms)
local requests = redis.call('ZCOUNT', key, since, '+inf')
local oldest = redis.call('ZRANGEBYSCORE', key, since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local frees = 0
if oldest[2] then frees = tonumber(oldest[2]) + window_ms - now_ms end
return {requests, tonumber(redis.call('GET', base .. ':tpm:' .. w) or '0'),
        tonumber(redis.call('GET', base .. ':day:' .. d) or '0'), frees, window_left, day_left}
"""
)


class PolicyDenied(AccessDenied):
    """A request the grant's policy refuses; ``rule`` names the field that refused it."""

    def __init__(
        self,
        status: int,
        error_type: str,
        *,
        rule: str,
        message: str,
        retry_after: int | None = None,
        retry: bool = True,
    ) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        if not retry:
            # Seconds of waiting will not help (a spent daily budget): SDKs must not retry.
            headers.append((b"x-should-retry", b"false"))
        super().__init__(status, error_type, f"policy {rule}: {message}", headers=headers)
        self.rule = rule


@dataclass(frozen=True)
class Ticket:
    """An admitted call of a metered grant: where its usage goes once it ends."""

    key: str
    window_seconds: int
    window: int
    day: int
    tpm: bool
    daily: bool


# --- paths, models and max_tokens ----------------------------------------------------------
def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


# Keys whose repetition could make keybroker and the upstream read different values.
_WATCHED_KEYS = frozenset({"model", "max_tokens", "params", "requests"})
_MISSING = object()


class _RepeatedKey(ValueError):
    pass


def _unique_watched_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen and key in _WATCHED_KEYS:
            raise _RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


def _asked(rule: str, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> list[dict[str, Any]]:
    """What the body asks the model for: itself, and each request of a message batch."""
    if not body:
        return []
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() not in {b"", b"identity"}:
            raise PolicyDenied(
                400,
                "invalid_request_error",
                rule=rule,
                message="a compressed request body cannot be checked; send it uncompressed",
            )
        if name == b"content-type" and value.strip().lower().startswith(b"multipart/"):
            return []  # file uploads: they name no model
    try:
        payload = json.loads(body, object_pairs_hook=_unique_watched_keys)
    except _RepeatedKey as repeated:
        raise PolicyDenied(
            400, "invalid_request_error", rule=rule, message=f"the body repeats the key {repeated}"
        ) from None
    except (ValueError, UnicodeDecodeError):
        # The upstream would refuse it too; passing it on unchecked could let a lenient
        # parser read a model that keybroker never saw.
        raise PolicyDenied(
            400, "invalid_request_error", rule=rule, message="the request body is not valid JSON"
        ) from None
    if not isinstance(payload, dict):
        return []
    asked = [payload]
    batch = payload.get("requests")
    if isinstance(batch, list):
        asked += [
            item["params"]
            for item in batch
            if isinstance(item, dict) and isinstance(item.get("params"), dict)
        ]
    return asked


def policy_check_request(
    policy: Policy,
    *,
    path: str,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    agent: str,
    backend: str,
) -> None:
    """Paths, models and the max_tokens cap: 403 naming the rule, before anything is sent."""
    who = f"agent {agent} on {backend}"
    # Matched as the upstream will read it; encoded slashes and dots never get this far.
    upstream_path = unquote(path)
    if policy.paths and not _matches(upstream_path, policy.paths):
        raise PolicyDenied(
            *FORBIDDEN,
            rule="paths",
            message=f"path {upstream_path[:200]} is not allowed for {who} "
            f"(allowed: {', '.join(policy.paths)})",
        )
    if not policy.reads_body:
        return
    for asked in _asked("models" if policy.models else "max_tokens", headers, body):
        model = asked.get("model", _MISSING)
        if (
            policy.models
            and model is not _MISSING
            and not (isinstance(model, str) and _matches(model, policy.models))
        ):
            shown = model[:100] if isinstance(model, str) else type(model).__name__
            raise PolicyDenied(
                *FORBIDDEN,
                rule="models",
                message=f"model {shown!r} is not allowed for {who} "
                f"(allowed: {', '.join(policy.models)})",
            )
        cap = policy.max_tokens
        wanted = asked.get("max_tokens", _MISSING)
        if cap is not None and wanted is not _MISSING:
            if isinstance(wanted, bool) or not isinstance(wanted, int):
                raise PolicyDenied(
                    *FORBIDDEN, rule="max_tokens", message="max_tokens must be a whole number"
                )
            if wanted > cap:
                raise PolicyDenied(
                    *FORBIDDEN,
                    rule="max_tokens",
                    message=f"max_tokens {wanted} is over the cap of {cap} for {who}",
                )


# --- rates and budgets ---------------------------------------------------------------------
def _key(policy: Policy) -> str:
    return redis_key("policy", str(policy.grant_id))


def _seconds(milliseconds: int) -> int:
    return max(1, math.ceil(milliseconds / 1000))


def _per(window_seconds: int) -> str:
    return "minute" if window_seconds == 60 else f"{window_seconds}s"


def _refusal(
    rule: str, wait_ms: int, used: int, policy: Policy, window_seconds: int, who: str
) -> PolicyDenied:
    wait = _seconds(wait_ms)
    if rule == "rpm":
        message = (
            f"{policy.rpm} requests per {_per(window_seconds)} used up for {who}; retry in {wait}s"
        )
    elif rule == "tpm":
        message = (
            f"{used:,} of {policy.tpm:,} tokens per {_per(window_seconds)} used for {who}; "
            f"retry in {wait}s"
        )
    else:
        message = (
            f"{used:,} of the daily budget of {policy.daily_tokens:,} tokens used for {who}; "
            f"it renews at 00:00 UTC, in {wait}s"
        )
    return PolicyDenied(
        *RATE_LIMITED, rule=rule, message=message, retry_after=wait, retry=rule != "daily_tokens"
    )


class PolicyGate:
    """Per event loop: its own async Redis client, with the scripts registered on it."""

    def __init__(self) -> None:
        self._url = ""
        self._client: redis.asyncio.Redis | None = None
        self._admit: Any = None
        self._settle: Any = None
        self._background: set[asyncio.Future[Any]] = set()

    def _scripts(self) -> tuple[Any, Any]:
        if self._client is None or self._url != settings.REDIS_URL:
            # Made again when the URL changes (a settings override), never per request.
            if self._client is not None:
                self._spawn(self._client.aclose())
            self._url = settings.REDIS_URL
            self._client = redis.asyncio.Redis.from_url(
                self._url, socket_connect_timeout=1, socket_timeout=1
            )
            # EVALSHA, falling back to EVAL once when Redis does not know the script yet.
            self._admit = self._client.register_script(ADMIT)
            self._settle = self._client.register_script(SETTLE)
        return self._admit, self._settle

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        # Held until done: the loop keeps only weak references to tasks.
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def admit(self, policy: Policy, *, agent: str, backend: str) -> Ticket | None:
        """Take a request slot and check the budgets; None when nothing needs counting."""
        if not policy.counted:
            return None
        window_seconds = settings.POLICY_WINDOW_SECONDS
        key = _key(policy)
        admit, _ = self._scripts()
        try:
            rule, wait_ms, window, day, used = await admit(
                keys=[],
                args=[
                    key,
                    window_seconds,
                    policy.rpm or 0,
                    policy.tpm or 0,
                    policy.daily_tokens or 0,
                    secrets.token_hex(8),
                ],
            )
        except (redis.RedisError, OSError) as exc:
            if settings.POLICY_FAIL_OPEN:
                logger.warning(
                    "policy limits of %s on %s unchecked, Redis unreachable (%s); "
                    "letting the call through (KEYBROKER_POLICY_FAIL_OPEN)",
                    agent,
                    backend,
                    type(exc).__name__,
                )
                return None
            logger.error("policy limits unchecked, Redis unreachable: refusing the call")
            raise PolicyDenied(
                503,
                "api_error",
                rule="unavailable",
                message="rate limits and budgets cannot be checked right now; try again shortly",
            ) from None
        if rule:
            raise _refusal(
                rule.decode(), int(wait_ms), int(used), policy, window_seconds,
                f"agent {agent} on {backend}",
            )  # fmt: skip
        if not policy.metered:
            return None
        return Ticket(
            key=key,
            window_seconds=window_seconds,
            window=int(window),
            day=int(day),
            tpm=policy.tpm is not None,
            daily=policy.daily_tokens is not None,
        )

    def settle(self, ticket: Ticket, usage: dict[str, int]) -> asyncio.Future[None] | None:
        """Count a finished call's tokens, off the response path; returns the task doing it
        (nobody on the request path waits for it)."""
        tokens = sum(max(0, usage.get(name) or 0) for name in COUNTED_USAGE)
        return self._spawn(self._count(ticket, tokens)) if tokens > 0 else None

    async def _count(self, ticket: Ticket, tokens: int) -> None:
        _, settle = self._scripts()
        try:
            await settle(
                keys=[],
                args=[
                    ticket.key, ticket.window_seconds, ticket.window, ticket.day, tokens,
                    int(ticket.tpm), int(ticket.daily),
                ],
            )  # fmt: skip
        except (redis.RedisError, OSError) as exc:
            # Lost, not queued: a limit that undercounts during an outage beats a proxy that
            # holds calls open for Redis.
            logger.error(
                "policy could not count %d tokens for %s (%s)", tokens, ticket.key,
                type(exc).__name__,
            )  # fmt: skip


_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PolicyGate] = (
    weakref.WeakKeyDictionary()
)


def policy_gate() -> PolicyGate:
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = PolicyGate()
    return gate


# --- what is left (for GET /v1/status) ---------------------------------------------------
def policy_left(policy: Policy) -> dict[str, Any]:
    """Each rate and budget of the grant: its limit, what is used and left, when it renews.

    ``used`` and ``remaining`` are None when Redis cannot be read; a limit that is not set
    is None altogether.
    """
    window_seconds = settings.POLICY_WINDOW_SECONDS
    reading: list[int | None] = [None] * 6
    if policy.counted:
        try:
            raw = redis_client().eval(READ, 0, _key(policy), window_seconds)
            reading = [int(value) for value in raw]
        except redis.RedisError:
            logger.warning("policy usage unreadable: Redis unreachable")
    requests, window_tokens, day_tokens, frees_ms, window_ms, day_ms = reading

    def entry(limit: int | None, used: int | None, renews_ms: int | None) -> dict[str, Any] | None:
        if limit is None:
            return None
        return {
            "limit": limit,
            "used": used,
            "remaining": max(0, limit - used) if used is not None else None,
            # Seconds until some of it comes back: the oldest request leaving the sliding
            # window, the fixed window ending, midnight UTC.
            "resets_in": None if used is None or renews_ms is None else _seconds(renews_ms),
        }

    return {
        "rpm": entry(policy.rpm, requests, frees_ms),
        "tpm": entry(policy.tpm, window_tokens, window_ms),
        "daily_tokens": entry(policy.daily_tokens, day_tokens, day_ms),
        "window_seconds": window_seconds,
    }
