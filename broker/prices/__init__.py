"""What a call cost in USD (issue 17), from price tables shipped as data and the operator's
own (``KEYBROKER_PRICES_FILE``).

Each table is TOML: ``[models."<pattern>"]`` entries of USD per million tokens (``input``,
``output``, ``cache_write_5m``, ``cache_write_1h``, ``cache_read``) and a
``batch_discount`` (0.5: a message batch's calls cost half), at the top of the file or per
model. A pattern is a model name or a glob (``claude-sonnet-4-5*`` covers its dated
versions); the longest pattern that matches wins, and the operator's file wins over the
shipped ones. A call whose model no table prices, or whose usage has tokens of a kind its
entry gives no price for, costs None ("unknown"), never 0.
"""

from __future__ import annotations

import fnmatch
import functools
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

SHIPPED = sorted(Path(__file__).parent.glob("*.toml"))
MILLION = Decimal(1_000_000)
# A call's cost is kept to the millionth of a dollar (audit's cost_usd column).
MICRO = Decimal("0.000001")
# The part of cache_creation_input_tokens written for an hour, when the provider says so
# (proxy/providers/base.py reads it): priced apart, the rest at the five-minute price.
CACHE_WRITE_1H = "cache_creation_1h_input_tokens"
PRICE_NAMES = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")


@dataclass(frozen=True)
class Price:
    """USD per million tokens of each kind; None where the table gives none."""

    pattern: str
    input: Decimal | None = None
    output: Decimal | None = None
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None
    cache_read: Decimal | None = None
    batch_discount: Decimal = Decimal(0)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ImproperlyConfigured(f"{where} must be a number")
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        raise ImproperlyConfigured(f"{where} must be a number") from None
    if not number.is_finite() or number < 0:
        raise ImproperlyConfigured(f"{where} must be a number of 0 or more")
    return number


def _read(path: Path) -> list[Price]:
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ImproperlyConfigured(f"price table {path} is unreadable: {exc}") from None
    discount = _decimal(table.get("batch_discount", 0), f"{path}: batch_discount")
    models = table.get("models", {})
    if not isinstance(models, dict):
        raise ImproperlyConfigured(f"{path}: [models] must be a table")
    prices = []
    for pattern, entry in models.items():
        where = f'{path}: models."{pattern}"'
        if not isinstance(entry, dict):
            raise ImproperlyConfigured(f"{where} must be a table")
        unknown = set(entry) - {*PRICE_NAMES, "batch_discount"}
        if unknown:
            raise ImproperlyConfigured(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        given = {
            name: _decimal(entry[name], f"{where}.{name}") for name in PRICE_NAMES if name in entry
        }
        own_discount = entry.get("batch_discount")
        batch = (
            discount if own_discount is None else _decimal(own_discount, f"{where}.batch_discount")
        )
        if batch > 1:
            raise ImproperlyConfigured(f"{where}: batch_discount is a fraction, at most 1")
        prices.append(Price(pattern=pattern, batch_discount=batch, **given))
    return prices


@functools.cache
def _tables(override: str) -> tuple[list[Price], ...]:
    """The operator's table first, then the shipped ones: the first that matches wins."""
    shipped = [price for path in SHIPPED for price in _read(path)]
    return ((_read(Path(override)) if override else []), shipped)


def price_tables() -> tuple[list[Price], ...]:
    return _tables(settings.PRICES_FILE)


def price_for(model: str) -> Price | None:
    """The entry that prices ``model``: the longest matching pattern of the first table
    (the operator's, then the shipped) that has one."""
    return _price_for(settings.PRICES_FILE, model) if model else None


# Every metered call asks, and a process sees few models: matching each call's model
# against every pattern again would be work on the proxy's hot path.
@functools.lru_cache(maxsize=1024)
def _price_for(override: str, model: str) -> Price | None:
    for table in _tables(override):
        matching = [p for p in table if fnmatch.fnmatchcase(model, p.pattern)]
        if matching:
            return max(matching, key=lambda price: len(price.pattern))
    return None


def call_cost(model: str, tokens: dict[str, int], *, batch: bool = False) -> Decimal | None:
    """What a call with this usage (the meter's names) cost in USD; None when unknown."""
    price = price_for(model)
    if price is None or not tokens:
        return None
    writes = max(0, tokens.get("cache_creation_input_tokens", 0))
    hour = min(max(0, tokens.get(CACHE_WRITE_1H, 0)), writes)
    counted = (
        (tokens.get("input_tokens", 0), price.input),
        (tokens.get("output_tokens", 0), price.output),
        (tokens.get("cache_read_input_tokens", 0), price.cache_read),
        (writes - hour, price.cache_write_5m),
        (hour, price.cache_write_1h),
    )
    total = Decimal(0)
    for count, per_million in counted:
        if count <= 0:
            continue
        if per_million is None:
            return None  # tokens the entry does not price: unknown, not free
        total += Decimal(count) * per_million
    if batch:
        total *= 1 - price.batch_discount
    return (total / MILLION).quantize(MICRO)
