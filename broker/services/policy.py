"""Policy on grants: which models and paths an agent may call, and how much.

Every field of a Grant's policy may be left unset (null): it then takes the backend's
default (``Backend.default_*``), and a default left unset means no restriction. The max
TTL of a grant can only lower the backend's own ``token_ttl_max``, which is its default.

This module validates policy input (the same rules and messages for the CLI, the admin and
the REST API), saves it and announces the change so every proxy process drops its cached
copy (``access_changed``). The effective policy travels with the proxy's cached token state;
enforcement and the Redis counters are in proxy/policy.py.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction

from audit.services import audit_record
from broker.infra.errors import NotFound, Problems, ServiceError
from broker.models import Agent, Backend, Grant
from broker.services.access import access_changed
from broker.services.agents import agent_grant
from broker.services.tokens import ttl_parse
from keybroker.wire import duration_format, duration_parse

User = AbstractBaseUser | AnonymousUser | None

# The names used by the CLI flags (dashes for underscores), the REST API and /v1/status.
POLICY_FIELDS = (
    "models",
    "paths",
    "rpm",
    "tpm",
    "daily_tokens",
    "daily_usd",
    "monthly_usd",
    "max_tokens",
    "max_concurrent",
    "max_ttl",
    "hold",
)
GRANT_COLUMNS = {
    "models": "allowed_models",
    "paths": "allowed_paths",
    "rpm": "rpm",
    "tpm": "tpm",
    "daily_tokens": "daily_tokens",
    "daily_usd": "daily_usd",
    "monthly_usd": "monthly_usd",
    "max_tokens": "max_tokens",
    "max_concurrent": "max_concurrent",
    "max_ttl": "max_ttl",
    "hold": "hold",
}
# A backend has no max_ttl default: its token_ttl_max is that bound already. A hold rule is
# a grant's own: which calls of which agent a person must see (docs/decisions.md).
GRANT_ONLY = ("max_ttl", "hold")
BACKEND_COLUMNS = {
    name: f"default_{column.removeprefix('allowed_')}"
    for name, column in GRANT_COLUMNS.items()
    if name not in GRANT_ONLY
}
LIST_FIELDS = ("models", "paths")
# Budgets in US dollars: counted in Redis as whole micro-dollars, the precision of a call's
# cost (broker/prices), and stored with as many places.
USD_FIELDS = ("daily_usd", "monthly_usd")
USD_PLACES = 6
USD_MAX = Decimal(1_000_000)
MICRO_USD = Decimal(1).scaleb(-USD_PLACES)
# Upper bounds keep values inside their columns and Redis' integers, and catch typos.
INT_BOUNDS = {
    "rpm": 1_000_000,
    "tpm": 10**12,
    "daily_tokens": 10**15,
    "max_tokens": 10_000_000,
    "max_concurrent": 10_000,
}
MAX_PATTERNS = 50
MAX_PATTERN_LENGTH = 200
# What a model id or an upstream path can hold, plus the glob characters * ? [ ] !.
_GLOB_CHARS = re.compile(r"^[A-Za-z0-9._:@/*?\[\]!~+=-]+$")
# Said in the CLI and the admin form: back to the backend's default.
INHERIT_WORDS = {"", "default"}
# How long a held call waits for a person (docs/decisions.md, "Held calls").
HOLD_TIMEOUT_DEFAULT = 120
HOLD_TIMEOUT_MIN = 5
HOLD_TIMEOUT_MAX = 3600
HOLD_KEYS = ("all", "models", "paths", "max_tokens_above", "timeout")


@dataclass(frozen=True)
class HoldRule:
    """Which calls of a grant wait for a person's decision, and for how long: every call
    (``all``), a model or path matching a glob, or a ``max_tokens`` above a number."""

    all: bool = False
    models: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    max_tokens_above: int | None = None
    timeout: int = HOLD_TIMEOUT_DEFAULT

    @property
    def reads_body(self) -> bool:
        return bool(self.models) or self.max_tokens_above is not None

    def json(self) -> dict[str, Any]:
        return {
            "all": self.all,
            "models": list(self.models),
            "paths": list(self.paths),
            "max_tokens_above": self.max_tokens_above,
            "timeout": self.timeout,
        }


def hold_rule_of(stored: Mapping[str, Any] | None) -> HoldRule | None:
    """The rule a grant's ``hold`` column holds (as ``_clean_hold`` wrote it)."""
    if not stored:
        return None
    return HoldRule(
        all=bool(stored.get("all")),
        models=tuple(stored.get("models") or ()),
        paths=tuple(stored.get("paths") or ()),
        max_tokens_above=stored.get("max_tokens_above"),
        timeout=int(stored.get("timeout") or HOLD_TIMEOUT_DEFAULT),
    )


@dataclass(frozen=True)
class Policy:
    """A grant's effective policy: its own values over the backend's defaults.

    Empty pattern tuples and None limits mean no restriction. Plain data, so it can sit
    in the proxy's cache and cross threads.
    """

    grant_id: int
    models: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    # USD per UTC day and per UTC calendar month, counted from each call's cost.
    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None
    max_tokens: int | None = None
    # Calls of this grant in flight at once, counted per proxy process (not in Redis).
    max_concurrent: int | None = None
    max_ttl: int | None = None
    # Calls a person must approve first (proxy/hold.py); None for nearly every grant.
    hold: HoldRule | None = None

    @property
    def counted(self) -> bool:
        """Whether a call needs Redis: only grants with a rate or a budget pay for it."""
        return self.rpm is not None or self.metered

    @property
    def metered(self) -> bool:
        """Whether a call's usage (tokens or cost) must be added up after it ends."""
        return self.counts_tokens or self.counts_usd

    @property
    def counts_tokens(self) -> bool:
        """Whether tokens are reserved before a call and counted after it."""
        return self.tpm is not None or self.daily_tokens is not None

    @property
    def counts_usd(self) -> bool:
        """Whether a call's cost is counted after it."""
        return self.daily_usd is not None or self.monthly_usd is not None

    @property
    def reads_body(self) -> bool:
        """Whether the request body must be read for a model or max_tokens rule."""
        return bool(self.models) or self.max_tokens is not None

    def limits(self) -> dict[str, Any]:
        """The policy as JSON-ready data, in the order of POLICY_FIELDS."""
        data = asdict(self)
        return {name: policy_value_json(name, data[name]) for name in POLICY_FIELDS}


def usd_text(amount: Decimal) -> str:
    """An amount of dollars as the API and the CLI show it: at least cents, no trailing
    zeros beyond them ("25.00", "0.0042"), never an exponent."""
    amount = amount.quantize(MICRO_USD).normalize()
    if amount.as_tuple().exponent > -2:  # type: ignore[operator]
        amount = amount.quantize(Decimal("0.01"))
    return f"{amount:f}"


def usd_micros(amount: Decimal) -> int:
    """Whole micro-dollars, as the Redis counters hold them."""
    return int(amount.quantize(MICRO_USD).scaleb(USD_PLACES))


def policy_value_json(name: str, value: Any) -> Any:
    """A policy value as JSON carries it: lists as lists, dollars as decimal strings."""
    if value is None:
        return None
    if name == "hold":
        rule = value if isinstance(value, HoldRule) else hold_rule_of(value)
        return rule.json() if rule is not None else None
    if name in LIST_FIELDS:
        return list(value)
    if name in USD_FIELDS:
        return usd_text(value)
    return value


def grant_policy(grant: Grant) -> Policy:
    """The effective policy of a grant; reads ``grant.backend`` (select it along)."""
    backend = grant.backend
    own = grant_values(grant)
    defaults = backend_defaults(backend)

    def pick(name: str) -> Any:
        return own[name] if own[name] is not None else defaults.get(name)

    bound = backend.token_ttl_max
    max_ttl = own["max_ttl"]
    return Policy(
        grant_id=grant.pk,
        models=tuple(pick("models") or ()),
        paths=tuple(pick("paths") or ()),
        rpm=pick("rpm"),
        tpm=pick("tpm"),
        daily_tokens=pick("daily_tokens"),
        daily_usd=pick("daily_usd"),
        monthly_usd=pick("monthly_usd"),
        max_tokens=pick("max_tokens"),
        max_concurrent=pick("max_concurrent"),
        # A backend bound lowered after the grant was set still wins.
        max_ttl=min(max_ttl, bound) if max_ttl is not None else None,
        hold=hold_rule_of(own["hold"]),
    )


def grant_values(grant: Grant) -> dict[str, Any]:
    """The grant's own policy fields, None where it takes the backend's default."""
    return {name: getattr(grant, column) for name, column in GRANT_COLUMNS.items()}


def backend_defaults(backend: Backend) -> dict[str, Any]:
    """The backend's policy defaults, None where there is none."""
    return {name: getattr(backend, column) for name, column in BACKEND_COLUMNS.items()}


# --- validation --------------------------------------------------------------------------
def glob_check(field: str, pattern: object) -> str:
    """One glob pattern, or ServiceError naming what is wrong with it."""
    if not isinstance(pattern, str):
        raise ServiceError("each pattern must be a string", field)
    text = pattern.strip()
    if not text:
        raise ServiceError("a pattern must not be empty", field)
    if len(text) > MAX_PATTERN_LENGTH:
        raise ServiceError(f"a pattern is at most {MAX_PATTERN_LENGTH} characters", field)
    if not _GLOB_CHARS.match(text):
        raise ServiceError(
            f"{text[:40]!r} holds characters no model or path has "
            "(use letters, digits, . _ - : @ / and the globs * ? [...])",
            field,
        )
    _brackets_check(field, text)
    if field == "paths" and not text.startswith("/"):
        raise ServiceError(f"{text!r} must start with / (a path on the upstream)", field)
    if field == "paths":
        _path_glob_check(field, text)
    return text


def _path_glob_check(field: str, text: str) -> None:
    if "***" in text:
        raise ServiceError(
            f"{text!r} has ***: use * within one segment, ** across segments",
            field,
        )
    if re.search(r"\[!?[^\]]*/", text):
        raise ServiceError(
            f"{text!r} has / in a [...] class, which never matches /: write the / outside it",
            field,
        )
    try:
        _path_regex(text)
    except re.error:
        # A reversed range such as [z-a]; fnmatch dropped it quietly.
        raise ServiceError(f"{text!r} has a [...] class with a bad range", field) from None


def path_allowed(path: str, patterns: Iterable[str]) -> bool:
    """Whether an upstream path matches one of a policy's path globs.

    Segment-aware, unlike fnmatch: ``*`` and ``?`` never match ``/`` (so ``/v1/messages*``
    is not ``/v1/messages/batches``), ``**`` matches anything including ``/``, and
    ``[...]`` classes never match ``/``. ``**`` may match nothing: ``/v1/messages**`` is
    ``/v1/messages`` and everything below it, ``/v1/messages/**`` only what is below.
    Case-sensitive, and the whole path must match.
    """
    return any(_path_matches(path, pattern) for pattern in patterns)


def _path_matches(path: str, pattern: str) -> bool:
    try:
        return _path_regex(pattern).match(path) is not None
    except re.error:
        # Saved before glob_check refused reversed ranges; fnmatch matched nothing with one.
        return False


@functools.lru_cache(maxsize=4096)
def _path_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            parts.append(".*")
            index += 2
            continue
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        elif char == "[":
            # Validated by glob_check: closed, not empty, "]" never a member.
            end = pattern.index("]", index + 1)
            members = pattern[index + 1 : end]
            negated = members.startswith("!")
            # Escaped as fnmatch does (~ & | would read as set operations); - keeps ranges.
            escaped = "".join("\\" + c if c in "\\^[]~&|" else c for c in members.removeprefix("!"))
            # The / is kept out by a lookahead: inside the class it could join a range.
            parts.append(f"(?!/)[{'^' if negated else ''}{escaped}]")
            index = end + 1
            continue
        else:
            parts.append(re.escape(char))
        index += 1
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def _brackets_check(field: str, text: str) -> None:
    # fnmatch would quietly read an unclosed [ as a literal, which is never what was meant.
    index = 0
    while index < len(text):
        char = text[index]
        if char == "]":
            raise ServiceError(f"{text!r} has a ] without its [", field)
        if char == "[":
            start = index + 1
            if text[start : start + 1] == "!":
                start += 1
            end = text.find("]", start)
            if end == -1:
                raise ServiceError(f"{text!r} has a [ that is never closed", field)
            if end == start:
                raise ServiceError(f"{text!r} has an empty [] class", field)
            index = end
        index += 1


def _clean_patterns(field: str, value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ServiceError("give a list of glob patterns", field)
    if len(value) > MAX_PATTERNS:
        raise ServiceError(f"at most {MAX_PATTERNS} patterns", field)
    patterns = list(dict.fromkeys(glob_check(field, item) for item in value))
    # An empty list would read as "nothing allowed"; it means "no list of its own".
    return patterns or None


def _clean_int(field: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServiceError("must be a whole number", field)
    if value < 1:
        raise ServiceError(
            f"must be at least 1, not {value} (leave it unset for no limit)",
            field,
        )
    if value > INT_BOUNDS[field]:
        raise ServiceError(f"must be at most {INT_BOUNDS[field]:,}", field)
    return value


def _clean_usd(field: str, value: object) -> Decimal | None:
    if value is None:
        return None
    # A string ("25.00", as JSON carries decimals) or a JSON number; never a bool.
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ServiceError('must be an amount in US dollars, such as "25.00"', field)
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ServiceError(
            f'{str(value)[:20]!r} is not an amount in US dollars, such as "25.00"', field
        ) from None
    if not amount.is_finite():
        raise ServiceError('must be an amount in US dollars, such as "25.00"', field)
    if amount <= 0:
        raise ServiceError(
            f"must be more than 0, not {str(value)[:20]} (leave it unset for no limit)", field
        )
    if amount > USD_MAX:
        raise ServiceError(f"must be at most {USD_MAX:,} USD", field)
    if amount != amount.quantize(MICRO_USD):
        raise ServiceError(
            f"has at most {USD_PLACES} decimal places (a millionth of a dollar)", field
        )
    return amount.quantize(MICRO_USD)


def _clean_max_ttl(backend: Backend, value: object) -> int | None:
    if value is None:
        return None
    try:
        seconds = ttl_parse(value)
    except ServiceError as exc:
        raise ServiceError(exc.text, "max_ttl") from None
    low, high = backend.token_ttl_min, backend.token_ttl_max
    if seconds > high:
        raise ServiceError(
            f"{duration_format(seconds)} is above backend {backend.name}'s bound "
            f"of {duration_format(high)}",
            "max_ttl",
        )
    if seconds < low:
        raise ServiceError(
            f"{duration_format(seconds)} is below backend {backend.name}'s shortest "
            f"token of {duration_format(low)}",
            "max_ttl",
        )
    return seconds


def policy_clean(
    *, backend: Backend, changes: Mapping[str, object], for_backend: bool = False
) -> dict[str, Any]:
    """Validate policy input; every problem is reported at once, and nothing is changed.

    ``changes`` maps POLICY_FIELDS names to values (None = take the default). Returns the
    same names with clean values.
    """
    allowed = BACKEND_COLUMNS if for_backend else GRANT_COLUMNS
    unknown = [name for name in changes if name not in allowed]
    if unknown:
        hint = " (a backend's bound is its token TTL max)" if "max_ttl" in unknown else ""
        hint += " (a hold rule is set on each grant)" if "hold" in unknown else ""
        raise ServiceError(f"unknown policy field: {', '.join(unknown)}{hint}")
    clean: dict[str, Any] = {}
    problems = Problems()
    for name, value in changes.items():
        with problems.check():
            if name in LIST_FIELDS:
                clean[name] = _clean_patterns(name, value)
            elif name == "max_ttl":
                clean[name] = _clean_max_ttl(backend, value)
            elif name in USD_FIELDS:
                clean[name] = _clean_usd(name, value)
            elif name == "hold":
                clean[name] = _clean_hold(value)
            else:
                clean[name] = _clean_int(name, value)
    problems.raise_if_any()
    return clean


def _clean_hold(value: object) -> dict[str, Any] | None:
    """A hold rule as stored: every key present, patterns checked, the timeout bounded."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ServiceError(
            'give an object such as {"all": true} or {"models": ["claude-opus-*"]}, '
            "or null for no hold",
            "hold",
        )
    unknown = sorted(str(key) for key in value if key not in HOLD_KEYS)
    if unknown:
        raise ServiceError(
            f"unknown key(s) {', '.join(unknown)}; use {', '.join(HOLD_KEYS)}", "hold"
        )
    every = value.get("all", False)
    if not isinstance(every, bool):
        raise ServiceError("all: must be true or false", "hold")
    patterns: dict[str, list[str]] = {}
    for kind in ("models", "paths"):
        try:
            patterns[kind] = _clean_patterns(kind, value.get(kind)) or []
        except ServiceError as exc:
            raise ServiceError(f"{kind}: {exc.text}", "hold") from None
    above = value.get("max_tokens_above")
    if above is not None and (
        isinstance(above, bool) or not isinstance(above, int) or not above >= 0
    ):
        raise ServiceError("max_tokens_above: must be a whole number, 0 or more", "hold")
    if above is not None and above > INT_BOUNDS["max_tokens"]:
        raise ServiceError(
            f"max_tokens_above: must be at most {INT_BOUNDS['max_tokens']:,}", "hold"
        )
    timeout = _hold_timeout(value.get("timeout"))
    if not (every or patterns["models"] or patterns["paths"] or above is not None):
        raise ServiceError(
            "holds no call: set all, models, paths or max_tokens_above (null removes the hold)",
            "hold",
        )
    return {"all": every, **patterns, "max_tokens_above": above, "timeout": timeout}


def _hold_timeout(value: object) -> int:
    if value is None:
        return HOLD_TIMEOUT_DEFAULT
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ServiceError('timeout: give seconds or a duration such as "2m"', "hold")
    try:
        seconds = int(duration_parse(str(value)))
    except ValueError as exc:
        raise ServiceError(f"timeout: {exc}", "hold") from None
    if not HOLD_TIMEOUT_MIN <= seconds <= HOLD_TIMEOUT_MAX:
        raise ServiceError(
            f"timeout: must be {duration_format(HOLD_TIMEOUT_MIN)} to "
            f"{duration_format(HOLD_TIMEOUT_MAX)}, not {duration_format(seconds)}",
            "hold",
        )
    return seconds


def hold_text(value: Mapping[str, Any] | HoldRule | None) -> str:
    """A hold rule as the CLI and the admin form write it: ``all; models=claude-opus-*;
    max_tokens_above=4000; timeout=2m`` (``hold_parse_text`` reads it back)."""
    rule = value if isinstance(value, HoldRule) or value is None else hold_rule_of(value)
    if rule is None:
        return ""
    parts = ["all"] if rule.all else []
    if rule.models:
        parts.append("models=" + ",".join(rule.models))
    if rule.paths:
        parts.append("paths=" + ",".join(rule.paths))
    if rule.max_tokens_above is not None:
        parts.append(f"max_tokens_above={rule.max_tokens_above}")
    parts.append(f"timeout={duration_format(rule.timeout)}")
    return "; ".join(parts)


def hold_parse_text(text: str) -> object:
    """``hold_text``'s form, or the JSON object the API takes; ``_clean_hold`` judges it."""
    if text.startswith("{"):
        try:
            parsed: object = json.loads(text)
        except ValueError:
            raise ServiceError("is not a JSON object", "hold") from None
        return parsed
    rule: dict[str, object] = {}
    for part in (item.strip() for item in text.split(";")):
        if not part:
            continue
        key, equals, found = (piece.strip() for piece in part.partition("="))
        key = key.replace("-", "_")
        if key == "all" and not equals:
            rule["all"] = True
        elif key in ("models", "paths") and equals:
            rule[key] = [item.strip() for item in found.split(",") if item.strip()]
        elif key == "max_tokens_above" and equals:
            if not re.fullmatch(r"\d{1,20}", found):
                raise ServiceError(
                    f"max_tokens_above: {found[:20]!r} is not a whole number", "hold"
                )
            rule[key] = int(found)
        elif key == "timeout" and equals:
            rule[key] = found
        else:
            raise ServiceError(
                f"{part[:40]!r} is not understood; write e.g. "
                "'all; timeout=2m' or 'models=claude-opus-*; max_tokens_above=4000'",
                "hold",
            )
    return rule


def policy_parse_text(name: str, text: str) -> object:
    """A value as typed in the CLI or the admin form: ``default`` or blank = inherit."""
    if name not in GRANT_COLUMNS:
        raise ServiceError(f"unknown policy field: {name}")
    value = text.strip()
    if value.lower() in INHERIT_WORDS:
        return None
    if name in LIST_FIELDS:
        return [item.strip() for item in value.split(",") if item.strip()]
    if name == "max_ttl":
        return value  # ttl_parse takes seconds or 90s, 30m, 1h
    if name == "hold":
        return hold_parse_text(value)
    if name in USD_FIELDS:
        return value.removeprefix("$")  # _clean_usd reads the amount
    if not re.fullmatch(r"-?\d{1,20}", value):
        raise ServiceError(f"{value[:20]!r} is not a whole number", name)
    return int(value)


def policy_parse_texts(texts: Mapping[str, str | None]) -> dict[str, object]:
    """Several fields at once; fields given as None are left out (unchanged)."""
    parsed: dict[str, object] = {}
    problems = Problems()
    for name, text in texts.items():
        if text is None:
            continue
        with problems.check():
            parsed[name] = policy_parse_text(name, text)
    problems.raise_if_any()
    return parsed


# --- changes -----------------------------------------------------------------------------
def _apply(
    target: Grant | Backend, columns: Mapping[str, str], clean: Mapping[str, Any]
) -> dict[str, Any]:
    changed: dict[str, Any] = {}
    for name, value in clean.items():
        column = columns[name]
        if getattr(target, column) != value:
            setattr(target, column, value)
            changed[name] = value
    if changed:
        target.save(update_fields=[columns[name] for name in changed])
    return changed


@transaction.atomic
def grant_update(*, grant: Grant, policy: Mapping[str, object], by: User = None) -> Grant:
    """Change a grant's policy: fields given are set (None = the backend's default), fields
    left out stay as they are. Bad input changes nothing."""
    clean = policy_clean(backend=grant.backend, changes=policy)
    changed = _apply(grant, GRANT_COLUMNS, clean)
    if changed:
        access_changed()
        audit_record(
            action="grant.updated",
            by=by,
            agent=grant.agent,
            backend=grant.backend.name,
            policy=policy_values_json(changed),
        )
    return grant


@transaction.atomic
def grant_set(
    *, agent: Agent, backend: Backend, policy: Mapping[str, object], by: User = None
) -> Grant:
    """Grant a backend (idempotent) with a policy; a bad policy grants nothing."""
    # Validated before the grant exists, so a refused policy leaves no grant behind.
    policy_clean(backend=backend, changes=policy)
    grant = agent_grant(agent=agent, backend=backend, by=by)
    return grant_update(grant=grant, policy=policy, by=by)


@transaction.atomic
def backend_policy_update(
    *, backend: Backend, policy: Mapping[str, object], by: User = None
) -> Backend:
    """Change a backend's policy defaults; every grant that leaves a field unset follows."""
    clean = policy_clean(backend=backend, changes=policy, for_backend=True)
    changed = _apply(backend, BACKEND_COLUMNS, clean)
    if changed:
        access_changed()
        audit_record(
            action="backend.policy_updated",
            by=by,
            backend=backend.name,
            policy=policy_values_json(changed),
        )
    return backend


def policy_values_json(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: policy_value_json(name, value) for name, value in values.items()}


def grant_get(*, agent: Agent, backend_name: str) -> Grant:
    grant = (
        agent.grants.select_related("backend", "agent").filter(backend__name=backend_name).first()
    )
    if grant is None:
        raise NotFound(f"agent {agent.name} has no grant for backend {backend_name!r}")
    return grant


def grants_of(agent: Agent) -> list[Grant]:
    return list(agent.grants.select_related("backend", "agent").order_by("backend__name"))


def grant_policy_sources(grant: Grant) -> dict[str, str | None]:
    """Where each effective value comes from: ``grant``, ``backend`` or None (unlimited)."""
    own, defaults = grant_values(grant), backend_defaults(grant.backend)
    sources: dict[str, str | None] = {}
    for name in POLICY_FIELDS:
        if own[name] is not None:
            sources[name] = "grant"
        elif name == "max_ttl":
            sources[name] = "backend"  # the backend's token_ttl_max
        else:
            sources[name] = "backend" if defaults.get(name) is not None else None
    return sources


def grant_describe(grant: Grant) -> dict[str, Any]:
    """A grant's policy as the admin API and the CLI show it: own, defaults, effective."""
    effective = grant_policy(grant).limits()
    effective["max_ttl"] = effective["max_ttl"] or grant.backend.token_ttl_max
    defaults = {**backend_defaults(grant.backend), "max_ttl": grant.backend.token_ttl_max}
    return {
        "agent": grant.agent.name,
        "backend": grant.backend.name,
        "policy": policy_values_json(grant_values(grant)),
        "defaults": policy_values_json(defaults),
        "effective": effective,
        "sources": grant_policy_sources(grant),
    }
