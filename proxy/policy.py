"""Policy at the proxy: refuse what a grant does not allow before anything goes upstream,
and count what it uses in Redis, so every process on every machine shares one limit.

Paths, models and the ``max_tokens`` cap are checked in memory, against the policy cached
with the token (proxy/access.py). Rates and budgets live in Redis, laid out as
``broker/selectors/policy.py`` describes (that module reads them for ``GET /v1/status``):
``rpm`` is a sliding window log, so the N+1st request within any window is refused whatever
the clock says and ``retry-after`` is exact; ``tpm`` and ``day`` count tokens per fixed
window and per UTC day; ``usd:day`` and ``usd:month`` count each call's cost, in
micro-dollars, per UTC day and UTC calendar month.

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
import contextlib
import fnmatch
import json
import logging
import math
import secrets
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

import redis
import redis.asyncio
from django.conf import settings

from audit.recorder import audit_enqueue
from broker.infra.loops import LoopLocal
from broker.infra.redis import async_counting_client, async_redis_client, redis_breaker
from broker.selectors.policy import USAGE_CLOCK, seconds_until, usage_key
from broker.services.policy import (
    MICRO_USD,
    HoldRule,
    Policy,
    path_allowed,
    usd_micros,
    usd_text,
)
from proxy.access import AccessDenied
from proxy.providers import ANTHROPIC, OPENAI, Wire

logger = logging.getLogger(__name__)

DAY_SECONDS = 86_400
EPOCH = date(1970, 1, 1)  # day numbers in the scripts count from it
# Every token the model read or wrote counts, cached or not (as LiteLLM counts them).
COUNTED_USAGE = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
MESSAGES_PATH = "/v1/messages"
BATCH_PATH = "/v1/messages/batches"
RATE_LIMITED = (429, "rate_limit_error")
USD_RULES = ("daily_usd", "monthly_usd")
# Budgets that renew only at midnight UTC or the month's end: refused not-retryable.
BUDGETS = ("daily_tokens", *USD_RULES)
FORBIDDEN = (403, "permission_error")

# ARGV: key base, window seconds, rpm, tpm, daily tokens (0 = no limit), a unique id for
# this request, request slots it takes (a batch takes one per request), tokens to reserve,
# whether the reservation must fit whole (1 for a batch), daily and monthly USD budgets in
# micro-dollars (0 = no limit). Returns {refusing rule or '', ms until it would pass (-1:
# never), window, day, used, month (yyyymm), the day number the next month starts on}.
ADMIT = (
    USAGE_CLOCK
    + """
local slots = tonumber(ARGV[7])
local reserve = tonumber(ARGV[8])
local whole = ARGV[9] == '1'
local day_key = base .. ':day:' .. d
local tpm_key = base .. ':tpm:' .. w
-- A call's cost is known only once it ends, so USD budgets reserve nothing: a call is
-- admitted while anything is left of them.
local usd_monthly = tonumber(ARGV[11])
if usd_monthly > 0 then
  local used = tonumber(redis.call('GET', base .. ':usd:month:' .. m) or '0')
  if used >= usd_monthly then
    return {'monthly_usd', month_left, window, day, used, m, month_end}
  end
end
local usd_daily = tonumber(ARGV[10])
if usd_daily > 0 then
  local used = tonumber(redis.call('GET', base .. ':usd:day:' .. d) or '0')
  if used >= usd_daily then
    return {'daily_usd', day_left, window, day, used, m, month_end}
  end
end
local daily = tonumber(ARGV[5])
if daily > 0 then
  local used = tonumber(redis.call('GET', day_key) or '0')
  if used >= daily or (whole and used + reserve > daily) then
    return {'daily_tokens', day_left, window, day, used, m, month_end}
  end
end
local tpm = tonumber(ARGV[4])
if tpm > 0 then
  if whole and reserve > tpm then return {'tpm', -1, window, day, 0, m, month_end} end
  local used = tonumber(redis.call('GET', tpm_key) or '0')
  if used >= tpm or (whole and used + reserve > tpm) then
    return {'tpm', window_left, window, day, used, m, month_end}
  end
end
local rpm = tonumber(ARGV[3])
if rpm > 0 then
  if slots > rpm then return {'rpm', -1, window, day, 0, m, month_end} end
  local key = base .. ':rpm'
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms - window_ms)
  local count = redis.call('ZCARD', key)
  if count + slots > rpm then
    -- Free once enough of the oldest requests have left the window.
    local nth = count + slots - rpm - 1
    local oldest = redis.call('ZRANGE', key, nth, nth, 'WITHSCORES')
    return {'rpm', tonumber(oldest[2]) + window_ms - now_ms, window, day, count, m, month_end}
  end
  for i = 1, slots do redis.call('ZADD', key, now_ms, ARGV[6] .. ':' .. i) end
  redis.call('PEXPIRE', key, window_ms)
end
if reserve > 0 then
  if daily > 0 then
    redis.call('INCRBY', day_key, reserve)
    redis.call('PEXPIRE', day_key, day_left + 1000)
  end
  if tpm > 0 then
    redis.call('INCRBY', tpm_key, reserve)
    redis.call('PEXPIRE', tpm_key, window_left + 1000)
  end
end
return {'', 0, window, day, 0, m, month_end}
"""
)

# Adds tokens (negative to give back part of a reservation) to the window and day a call
# started in, and its cost in micro-dollars to that day and month. A window, day or month
# that is already over is left alone: nobody reads it again.
_SETTLE_FUNCTION = """
local function add(key, amount, ends_ms, now_ms)
  if amount ~= 0 and now_ms < ends_ms then
    redis.call('INCRBY', key, amount)
    redis.call('PEXPIRE', key, ends_ms - now_ms + 1000)
  end
end
local function settle(base, window_seconds, window, day, tokens, count_tpm, count_day,
                      micros, usd_day, month, month_end, usd_month)
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local d = string.format('%d', day)
  if count_tpm then
    add(base .. ':tpm:' .. string.format('%d', window), tokens,
        (window + 1) * window_seconds * 1000, now_ms)
  end
  if count_day then add(base .. ':day:' .. d, tokens, (day + 1) * 86400000, now_ms) end
  if usd_day then add(base .. ':usd:day:' .. d, micros, (day + 1) * 86400000, now_ms) end
  if usd_month then
    add(base .. ':usd:month:' .. month, micros, month_end * 86400000, now_ms)
  end
end
"""

# ARGV: key base, window seconds, window, day, tokens, count in the window (1/0), count in
# the day (1/0), micro-dollars, count them in the day (1/0), month (yyyymm), the day the
# next month starts on, count them in the month (1/0); then the daily token budget and the
# daily and monthly USD budgets in micro-dollars (0 = none), for the alerts: returns each
# threshold (80 and 100 % of a budget) this call's counting took the total past for the
# first time in its period, as '<budget>:<percent>:<used>'. A flag per budget, period and
# threshold (SET NX, gone with the period) makes each crossing said once, whichever
# process counted it.
SETTLE = (
    _SETTLE_FUNCTION
    + """
settle(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
       ARGV[6] == '1', ARGV[7] == '1', tonumber(ARGV[8]), ARGV[9] == '1', ARGV[10],
       tonumber(ARGV[11]), ARGV[12] == '1')
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local crossed = {}
local function check(name, key, limit, ends_ms)
  if limit <= 0 or now_ms >= ends_ms then return end
  local used = tonumber(redis.call('GET', key) or '0')
  for _, percent in ipairs({80, 100}) do
    if used * 100 >= limit * percent
        and redis.call('SET', key .. ':alerted:' .. percent, '1', 'NX',
                       'PX', ends_ms - now_ms + 1000) then
      table.insert(crossed, name .. ':' .. percent .. ':' .. string.format('%d', used))
    end
  end
end
local day = tonumber(ARGV[4])
local d = string.format('%d', day)
check('daily_tokens', ARGV[1] .. ':day:' .. d, tonumber(ARGV[13]), (day + 1) * 86400000)
check('daily_usd', ARGV[1] .. ':usd:day:' .. d, tonumber(ARGV[14]), (day + 1) * 86400000)
check('monthly_usd', ARGV[1] .. ':usd:month:' .. ARGV[10], tonumber(ARGV[15]),
      tonumber(ARGV[11]) * 86400000)
return crossed
"""
)

# A created batch's reservation, held until its results are read. ARGV: key base, batch
# id, tokens its results used and their cost in micro-dollars ('' when unknown: no cost
# is counted), or tokens '' when the results could not be read (the reservation stands).
# Returns 1 when the batch was held (and is now settled), 0 when it was not or already was.
# A batch held before USD budgets existed has no month in its record and counts no cost.
SETTLE_BATCH = (
    _SETTLE_FUNCTION
    + """
local key = ARGV[1] .. ':batch:' .. ARGV[2]
local held = redis.call('GET', key)
if not held then return 0 end
redis.call('DEL', key)
local window_seconds, window, day, reserved, tpm, daily, month, month_end, usd_day, usd_month =
  string.match(held, '^(%d+):(%d+):(%d+):(%d+):(%d):(%d):(%d+):(%d+):(%d):(%d)$')
if not window_seconds then
  window_seconds, window, day, reserved, tpm, daily =
    string.match(held, '^(%d+):(%d+):(%d+):(%d+):(%d):(%d)$')
  month, month_end, usd_day, usd_month = '0', '0', '0', '0'
end
if not window_seconds or ARGV[3] == '' then return 1 end
local tokens = tonumber(ARGV[3]) - tonumber(reserved)
local micros = tonumber(ARGV[4]) or 0
settle(ARGV[1], tonumber(window_seconds), tonumber(window), tonumber(day), tokens,
       tpm == '1', daily == '1', micros, usd_day == '1', month, tonumber(month_end),
       usd_month == '1')
return 1
"""
)
# Results are kept by Anthropic for 29 days after a batch is created.
BATCH_HOLD_SECONDS = 30 * DAY_SECONDS


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

    @property
    def action(self) -> str:
        return "policy.denied"  # whatever its status: a body it cannot check, Redis down


@dataclass(frozen=True)
class Demand:
    """What a call asks of a grant's limits before it is sent.

    ``requests`` slots of the rpm (one per request of a message batch); ``tokens`` reserved
    from tpm and the daily budget until its usage is known (max_tokens plus the input's
    size, a quarter of its bytes); a ``batch`` must fit whole in what is left.
    """

    requests: int = 1
    tokens: int = 0
    batch: bool = False


@dataclass(frozen=True)
class Ticket:
    """An admitted call of a metered grant: where its usage goes once it ends."""

    key: str
    window_seconds: int
    window: int
    day: int
    tpm: bool
    daily: bool
    reserved: int = 0
    # The UTC month the call started in (yyyymm), the day number the next one starts on,
    # and whether the call's cost counts toward the daily and monthly USD budgets.
    month: str = ""
    month_end: int = 0
    usd_daily: bool = False
    usd_monthly: bool = False
    # Who the budgets belong to and how big they are, for the alert when one is crossed
    # (micro-dollars; 0 = no such budget).
    agent: str = ""
    backend: str = ""
    daily_tokens_limit: int = 0
    daily_usd_limit: int = 0
    monthly_usd_limit: int = 0

    @property
    def counts_tokens(self) -> bool:
        return self.tpm or self.daily

    @property
    def counts_usd(self) -> bool:
        return self.usd_daily or self.usd_monthly


def counted_tokens(usage: dict[str, int]) -> int:
    return sum(max(0, usage.get(name) or 0) for name in COUNTED_USAGE)


# --- paths, models and max_tokens ----------------------------------------------------------
def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


# Keys whose repetition could make keybroker and the upstream read different values.
_WATCHED_KEYS = frozenset(
    {"model", "params", "requests", *ANTHROPIC.max_tokens_fields, *OPENAI.max_tokens_fields}
)
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
    # Read by its content, whatever Content-Type says: a JSON body labelled multipart/* was
    # still read as JSON upstream, so skipping it let any model through.
    try:
        payload = json.loads(body, object_pairs_hook=_unique_watched_keys)
    except _RepeatedKey as repeated:
        raise PolicyDenied(
            400, "invalid_request_error", rule=rule, message=f"the body repeats the key {repeated}"
        ) from None
    except (ValueError, UnicodeDecodeError):
        if _is_multipart(headers, body):
            return []  # a file upload: it names no model
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


def _is_multipart(headers: Iterable[tuple[bytes, bytes]], body: bytes) -> bool:
    """Labelled multipart and beginning with its boundary. A body that only says it is
    multipart could be JSON that a lenient reader upstream takes (tests/faults); RFC 2046
    allows a preamble before the first boundary, but no SDK sends one."""
    for name, value in headers:
        kind, _, params = value.partition(b";")
        if name != b"content-type" or not kind.strip().lower().startswith(b"multipart/"):
            continue
        for param in params.split(b";"):
            key, _, boundary = param.partition(b"=")
            boundary = boundary.strip().strip(b'"')
            if key.strip().lower() == b"boundary" and boundary:
                return body.startswith(b"--" + boundary)
    return False


def policy_demand(method: str, path: str, facts: dict[str, Any], body_size: int) -> Demand:
    """What a call will take from rates and budgets, from the facts of its body
    (``request_facts``): messages reserve max_tokens plus their input's estimate, a batch
    a slot per request and the sum of its requests' max_tokens."""
    if method != "POST":
        return Demand()
    path = unquote(path)
    input_estimate = math.ceil(body_size / 4)
    if path == MESSAGES_PATH:
        return Demand(tokens=facts.get("max_tokens", 0) + input_estimate)
    if path == BATCH_PATH and "batch_requests" in facts:
        return Demand(
            requests=max(1, facts["batch_requests"]),
            tokens=facts.get("batch_max_tokens", 0) + input_estimate,
            batch=True,
        )
    return Demand()


def policy_check_request(
    policy: Policy,
    *,
    path: str,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    agent: str,
    backend: str,
    wire: Wire = ANTHROPIC,
) -> None:
    """Paths, models and the max_tokens cap: 403 naming the rule, before anything is sent."""
    who = f"agent {agent} on {backend}"
    # Matched as the upstream will read it; encoded slashes and dots never get this far.
    upstream_path = unquote(path)
    if policy.paths and not path_allowed(upstream_path, policy.paths):
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
        if cap is None:
            continue
        named = [name for name in wire.max_tokens_fields if name in asked]
        if not named and path.startswith(wire.uncapped_by_default):
            # Without a cap of its own the call may write up to the model's limit.
            raise PolicyDenied(
                *FORBIDDEN,
                rule="max_tokens",
                message=f"{wire.max_tokens_fields[0]} must be set, at most {cap} for {who}",
            )
        for name in named:  # each: the upstream may read any of them
            wanted = asked[name]
            if isinstance(wanted, bool) or not isinstance(wanted, int):
                raise PolicyDenied(
                    *FORBIDDEN, rule="max_tokens", message=f"{name} must be a whole number"
                )
            if wanted > cap:
                raise PolicyDenied(
                    *FORBIDDEN,
                    rule="max_tokens",
                    message=f"{name} {wanted} is over the cap of {cap} for {who}",
                )


def hold_match(
    rule: HoldRule,
    *,
    path: str,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    wire: Wire = ANTHROPIC,
) -> str | None:
    """Which part of a grant's hold rule this call meets (``all``, ``paths``, ``models``,
    ``max_tokens_above``), or None when it goes on without a person. The same matchers as
    the allow lists: segment-aware path globs, fnmatch model globs, each request of a batch."""
    if rule.all:
        return "all"
    if rule.paths and path_allowed(unquote(path), rule.paths):
        return "paths"
    if not rule.reads_body:
        return None
    for asked in _asked("hold", headers, body):
        model = asked.get("model")
        if rule.models and isinstance(model, str) and _matches(model, rule.models):
            return "models"
        above = rule.max_tokens_above
        if above is not None and any(
            _whole_above(asked.get(name), above) for name in wire.max_tokens_fields
        ):
            return "max_tokens_above"
    return None


def _whole_above(value: Any, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > bound


# --- what one process holds ---------------------------------------------------------------
class ProcessLoad:
    """Per process: each grant's calls in flight, and the request-body bytes held in memory.

    Memory is a process's own, so these bounds are too (docs/decisions.md); every process
    on every machine has its own. Touched only from the event loop's thread.
    """

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}
        self.body_bytes = 0

    @contextlib.contextmanager
    def call(self, policy: Policy | None, *, agent: str, backend: str) -> Iterator[None]:
        """One call of a grant in flight; 429 while ``max_concurrent`` of them are."""
        if policy is None or policy.max_concurrent is None:
            yield
            return
        grant_id = policy.grant_id
        if self.calls.get(grant_id, 0) >= policy.max_concurrent:
            raise PolicyDenied(
                *RATE_LIMITED,
                rule="max_concurrent",
                message=f"{policy.max_concurrent} calls already in flight for agent {agent} "
                f"on {backend}; retry when one ends",
                retry_after=1,
            )
        self.calls[grant_id] = self.calls.get(grant_id, 0) + 1
        try:
            yield
        finally:
            left = self.calls[grant_id] - 1
            if left:
                self.calls[grant_id] = left
            else:
                del self.calls[grant_id]

    def hold_body(self, size: int) -> None:
        """Take ``size`` more bytes of the process' body budget, or 503 when it is spent."""
        if self.body_bytes + size > settings.PROXY_BUFFERED_BODY_BYTES:
            raise AccessDenied(
                503,
                "overloaded_error",
                "keybroker holds too many request bodies right now; retry shortly",
                headers=[(b"retry-after", b"1")],
            )
        self.body_bytes += size

    def release_body(self, size: int) -> None:
        self.body_bytes -= size


process_load = ProcessLoad()


# --- rates and budgets ---------------------------------------------------------------------
def _per(window_seconds: int) -> str:
    return "minute" if window_seconds == 60 else f"{window_seconds}s"


def _next_month(month: str) -> str:
    """The first day of the month after ``yyyymm``, as a date."""
    year, number = int(month[:4]), int(month[4:])
    return f"{year + number // 12:04d}-{number % 12 + 1:02d}-01"


def _usd_refusal(rule: str, wait: int, used: int, policy: Policy, month: str, who: str) -> str:
    spent = usd_text(Decimal(used) * MICRO_USD)
    if rule == "daily_usd":
        limit, per, renews = policy.daily_usd, "daily", "at 00:00 UTC"
    else:
        limit, per, renews = policy.monthly_usd, "monthly", f"on {_next_month(month)} 00:00 UTC"
    assert limit is not None  # the script refuses only by a budget that is set
    return (
        f"${spent} of the {per} budget of ${usd_text(limit)} spent for {who}; "
        f"it renews {renews}, in {wait}s"
    )


def _refusal(
    rule: str, wait_ms: int, used: int, policy: Policy, demand: Demand, window_seconds: int,
    who: str, month: str = "",
) -> PolicyDenied:  # fmt: skip
    if wait_ms < 0:
        # A batch bigger than the limit itself: no amount of waiting lets it through.
        limit = policy.rpm if rule == "rpm" else policy.tpm
        asks = f"{demand.requests:,} requests" if rule == "rpm" else f"{demand.tokens:,} tokens"
        return PolicyDenied(
            *RATE_LIMITED,
            rule=rule,
            message=f"this batch takes {asks}, over the {rule} of {limit:,} for {who}; "
            "split it into smaller batches",
            retry=False,
        )
    wait = seconds_until(wait_ms)
    batch = f"a batch of {demand.requests:,} requests reserving {demand.tokens:,} tokens does "
    if rule == "rpm":
        message = (
            f"{policy.rpm} requests per {_per(window_seconds)} used up for {who}; retry in {wait}s"
            if not demand.batch
            else f"{batch}not fit in the {policy.rpm} requests per {_per(window_seconds)} "
            f"left for {who}; retry in {wait}s"
        )
    elif rule in USD_RULES:
        message = _usd_refusal(rule, wait, used, policy, month, who)
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
    if demand.batch and rule != "rpm":
        message = f"{batch}not fit: {message}"
    # Waiting until midnight or the month's end is not a retry.
    return PolicyDenied(
        *RATE_LIMITED, rule=rule, message=message, retry_after=wait, retry=rule not in BUDGETS
    )


def _micros(budget: Decimal | None) -> int:
    return 0 if budget is None else usd_micros(budget)


class PolicyGate:
    """Per event loop: the scripts, registered on the loop's shared Redis client."""

    def __init__(self) -> None:
        self._client: redis.asyncio.Redis | None = None
        self._scripts_of: dict[str, Any] = {}
        self._background: set[asyncio.Future[Any]] = set()

    def _script(self, name: str) -> Any:
        client = async_redis_client()
        if client is not self._client:
            # Registered again only when the client changes (a settings override).
            self._client = client
            self._scripts_of = {
                # EVALSHA, falling back to EVAL once when Redis does not know it yet.
                "admit": client.register_script(ADMIT),
                "settle": client.register_script(SETTLE),
                "settle_batch": client.register_script(SETTLE_BATCH),
            }
        return self._scripts_of[name]

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        # Held until done: the loop keeps only weak references to tasks.
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def admit(
        self, policy: Policy, *, agent: str, backend: str, demand: Demand = Demand()
    ) -> Ticket | None:
        """Take request slots, check the budgets and reserve the call's estimate from
        them; None when nothing needs counting afterwards."""
        if not policy.counted:
            return None
        window_seconds = settings.POLICY_WINDOW_SECONDS
        key = usage_key(policy)
        reserve = demand.tokens if policy.counts_tokens else 0
        try:
            redis_breaker().check()
            rule, wait_ms, window, day, used, month, month_end = await self._script("admit")(
                keys=[],
                args=[
                    key, window_seconds, policy.rpm or 0, policy.tpm or 0,
                    policy.daily_tokens or 0, secrets.token_hex(8), demand.requests, reserve,
                    int(demand.batch), _micros(policy.daily_usd), _micros(policy.monthly_usd),
                ],
            )  # fmt: skip
        except (redis.RedisError, OSError) as exc:
            redis_breaker().trip_on(exc)
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
                rule.decode(), int(wait_ms), int(used), policy, demand, window_seconds,
                f"agent {agent} on {backend}", month.decode(),
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
            reserved=reserve,
            month=month.decode(),
            month_end=int(month_end),
            usd_daily=policy.daily_usd is not None,
            usd_monthly=policy.monthly_usd is not None,
            agent=agent,
            backend=backend,
            daily_tokens_limit=policy.daily_tokens or 0,
            daily_usd_limit=_micros(policy.daily_usd),
            monthly_usd_limit=_micros(policy.monthly_usd),
        )

    def settle(
        self, ticket: Ticket, usage: dict[str, int] | None, cost: Decimal | None = None
    ) -> asyncio.Future[None] | None:
        """Count a finished call's tokens in place of its reservation, and its cost in USD,
        off the response path; ``usage`` None means it could not be read, and the
        reservation stands; ``cost`` None (unknown, or a model without a price) counts
        nothing toward USD budgets. Returns the task doing it (nobody on the request path
        waits for it)."""
        tokens = 0
        if ticket.counts_tokens:
            tokens = (counted_tokens(usage) if usage is not None else ticket.reserved) - (
                ticket.reserved
            )
        micros = usd_micros(cost) if cost is not None and ticket.counts_usd else 0
        if tokens == 0 and micros == 0:
            return None
        args = [
            ticket.key, ticket.window_seconds, ticket.window, ticket.day, tokens,
            int(ticket.tpm), int(ticket.daily), micros, int(ticket.usd_daily), ticket.month,
            ticket.month_end, int(ticket.usd_monthly), ticket.daily_tokens_limit,
            ticket.daily_usd_limit, ticket.monthly_usd_limit,
        ]  # fmt: skip
        what = f"count {tokens} tokens and {micros} micro-dollars for {ticket.key}"
        return self._spawn(self._settle(ticket, args, what))

    async def _settle(self, ticket: Ticket, args: list[Any], what: str) -> None:
        crossed = await self._run("settle", args, what)
        for crossing in crossed or ():
            budget_crossed(ticket, crossing.decode() if isinstance(crossing, bytes) else crossing)

    def hold_batch(self, ticket: Ticket, batch_id: str) -> asyncio.Future[None]:
        """Keep a created batch's reservation until its results are read (settle_batch)."""
        held = (
            f"{ticket.window_seconds}:{ticket.window}:{ticket.day}:{ticket.reserved}:"
            f"{int(ticket.tpm)}:{int(ticket.daily)}:{ticket.month or 0}:{ticket.month_end}:"
            f"{int(ticket.usd_daily)}:{int(ticket.usd_monthly)}"
        )
        return self._spawn(self._hold(f"{ticket.key}:batch:{batch_id}", held))

    def settle_batch(
        self,
        ticket: Ticket,
        batch_id: str,
        usage: dict[str, int] | None,
        cost: Decimal | None = None,
    ) -> asyncio.Future[None]:
        """Count a batch's usage, read from its results, in place of its reservation, and
        its cost, in the window, day and month it was created in; results read again count
        nothing."""
        used = "" if usage is None else str(counted_tokens(usage))
        micros = "" if cost is None else str(usd_micros(cost))
        return self._spawn(
            self._run(
                "settle_batch", [ticket.key, batch_id, used, micros], f"settle batch {batch_id}"
            )
        )

    async def _hold(self, key: str, held: str) -> None:
        try:
            await async_counting_client().set(key, held, ex=BATCH_HOLD_SECONDS)
        except (redis.RedisError, OSError) as exc:
            logger.error("policy could not hold a batch's reservation (%s)", type(exc).__name__)

    async def _run(self, script: str, args: list[Any], what: str) -> Any:
        try:
            return await self._script(script)(keys=[], args=args, client=async_counting_client())
        except (redis.RedisError, OSError) as exc:
            # Lost, not queued: a limit that undercounts during an outage beats a proxy that
            # holds calls open for Redis.
            logger.error("policy could not %s (%s)", what, type(exc).__name__)
            return None


def budget_crossed(ticket: Ticket, crossing: str) -> None:
    """Record a budget crossing 80 or 100 % (``'<budget>:<percent>:<used>'`` from SETTLE) as
    a ``budget.threshold`` audit event, which the alerts send (audit/alerts.py)."""
    budget, percent, used = crossing.split(":")
    if budget == "daily_tokens":
        limit = ticket.daily_tokens_limit
        amounts = f"{int(used):,} of {limit:,} tokens"
        shown_used: int | str = int(used)
        shown_limit: int | str = limit
    else:
        limit = ticket.daily_usd_limit if budget == "daily_usd" else ticket.monthly_usd_limit
        shown_used = usd_text(Decimal(used) * MICRO_USD)
        shown_limit = usd_text(Decimal(limit) * MICRO_USD)
        amounts = f"${shown_used} of ${shown_limit}"
    renews = "at 00:00 UTC" if budget != "monthly_usd" else f"on {_next_month(ticket.month)}"
    audit_enqueue(
        action="budget.threshold",
        agent=ticket.agent,
        backend=ticket.backend,
        message=f"{budget} budget {percent}% used: {amounts} (it renews {renews})",
        budget=budget,
        percent=int(percent),
        used=shown_used,
        limit=shown_limit,
        period=f"{ticket.month[:4]}-{ticket.month[4:]}"
        if budget == "monthly_usd"
        else (EPOCH + timedelta(days=ticket.day)).isoformat(),
    )


_gates = LoopLocal(PolicyGate)


def policy_gate() -> PolicyGate:
    return _gates.get()
