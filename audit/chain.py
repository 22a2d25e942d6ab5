"""The audit trail's hash chain: every event carries SHA-256(previous hash ‖ its own fields),
so an edited, deleted or inserted row shows.

One writer for every door (``audit_record``, the proxy's recorder, the spill replay):
``chain_write`` locks the chain's head row (``AuditChain``, pk=1) in the transaction that
inserts the events, gives each the next place (``chain_seq``) and its hash, and moves the
head. On PostgreSQL the lock is ``SELECT ... FOR UPDATE``; SQLite runs writers one at a time
already (IMMEDIATE transactions). One locked row per batch, not per event.

An event's hash covers its place and every column but the database id, which is not known
before the insert (hashing it would cost a second write per row); the place is the order
that matters, and a deleted row leaves a gap in it. The serialization is versioned
(``CANONICAL_VERSION``): changing it would break every existing chain.

Retention deletes whole segments from the start of the chain and records an
``AuditCheckpoint`` (the last deleted place and hash) first, so verification starts after
it. docs/decisions.md has the reasoning and the measured cost.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import connection, models, transaction

from audit.models import AuditChain, AuditCheckpoint, AuditEvent
from audit.sink import audit_sink_send

GENESIS = "0" * 64
CANONICAL_VERSION = 1
# Every column an event's hash covers (all but id and the chain's own two).
HASHED_FIELDS = (
    "created_at", "action", "actor_type", "actor", "agent", "agent_id", "backend", "token_id",
    "token_prefix", "client_address", "message", "method", "path", "model", "system_prompt",
    "streamed", "status", "outcome", "request_id", "input_tokens", "output_tokens",
    "cache_read_tokens", "cache_write_tokens", "stop_reason", "ttfb_ms", "duration_ms",
    "cost_usd", "policy_result", "policy_reason", "detail",
)  # fmt: skip
_SIX_PLACES = Decimal("0.000001")

Row = dict[str, Any]


# --- hashing -----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON the database gives back as it was given: a float that is whole becomes an int
    (PostgreSQL's jsonb keeps numbers as numerics and reads 2.0 back as 2)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _time(value: Any) -> str:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


@functools.lru_cache(maxsize=4096)
def _address(value: str) -> str:
    # The database may write an IPv6 address its own way; parsing is what costs, hence the cache.
    return ipaddress.ip_address(value).compressed


def _cost(value: Any) -> str:
    return format(Decimal(str(value)).quantize(_SIX_PLACES), "f")


def _milliseconds(value: Any) -> str:
    return repr(float(value))


# How a value reads the same before the insert and after the database gives it back.
_CANONICAL: dict[str, Callable[[Any], Any]] = {
    "created_at": _time,
    "agent_id": str,  # a UUID once read back, text in a queued row
    "client_address": lambda value: _address(str(value)),
    "cost_usd": _cost,
    "ttfb_ms": _milliseconds,
    "duration_ms": _milliseconds,
    "detail": _plain,
}


def canonical(seq: int, values: Callable[[str], Any]) -> bytes:
    """The bytes an event's hash covers: its place and fields as sorted, compact JSON."""
    data: dict[str, Any] = {"seq": seq, "v": CANONICAL_VERSION}
    for name in HASHED_FIELDS:
        value = values(name)
        if value is not None and name in _CANONICAL:
            value = _CANONICAL[name](value)
        data[name] = value
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link_hash(previous: str, seq: int, values: Callable[[str], Any]) -> str:
    return hashlib.sha256(previous.encode("ascii") + canonical(seq, values)).hexdigest()


def event_values(event: AuditEvent) -> Callable[[str], Any]:
    return lambda name: getattr(event, name)


# --- writing -----------------------------------------------------------------------------
def _head_locked() -> AuditChain:
    head = AuditChain.objects.select_for_update().filter(pk=1).first()
    if head is None:
        # The migration creates it; a database flushed by tests starts the chain again.
        AuditChain.objects.get_or_create(pk=1)
        head = AuditChain.objects.select_for_update().get(pk=1)
    return head


def chain_write(rows: list[Row]) -> list[AuditEvent]:
    """Insert ``rows`` as the next events of the chain, in the caller's transaction if there
    is one (a rollback takes their places back with them); the events, with their ids."""
    if not rows:
        return []
    with transaction.atomic():
        head = _head_locked()
        previous, seq = head.hash, head.seq
        events = []
        for row in rows:
            seq += 1
            # Hashed as the model holds it, defaults filled in, as it will read back.
            event = AuditEvent(**row, chain_seq=seq)
            event.chain_hash = previous = link_hash(previous, seq, event_values(event))
            events.append(event)
        written = _insert(events)
        AuditChain.objects.filter(pk=1).update(seq=seq, hash=previous)
        # Sent off the request path once committed; a rollback sends nothing.
        transaction.on_commit(lambda: audit_sink_send(written))
    return written


# Columns whose Python value the database driver cannot take as it is: Django prepares
# them (a UUID as hex on SQLite, a datetime as text there, a Decimal, JSON, an address).
_PREPARED_FIELDS = (
    models.DateTimeField, models.UUIDField, models.DecimalField, models.JSONField,
    models.GenericIPAddressField,
)  # fmt: skip


def _insert(events: list[AuditEvent]) -> list[AuditEvent]:
    """``bulk_create`` without its generic work per field and row, which was most of the
    audit writer's CPU (a thread that takes turns with every call in flight, issue 13): one
    multi-row INSERT ... RETURNING id with each value prepared as Django would."""
    if not connection.features.can_return_rows_from_bulk_insert:
        return AuditEvent.objects.bulk_create(events)
    fields = [f for f in AuditEvent._meta.concrete_fields if not f.primary_key]
    prepare = [
        (f.attname, f.get_db_prep_save if isinstance(f, _PREPARED_FIELDS) else None) for f in fields
    ]
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
    pk = connection.ops.quote_name(AuditEvent._meta.pk.column)
    # Within SQLite's and PostgreSQL's limits on parameters per statement.
    per_statement = max(1, 30_000 // len(fields))
    for start in range(0, len(events), per_statement):
        chunk = events[start : start + per_statement]
        params: list[Any] = []
        for event in chunk:
            for attname, prep in prepare:
                value = getattr(event, attname)
                params.append(value if prep is None else prep(value, connection))
        # Names quoted from the model's own metadata; every value is a parameter.
        sql = (
            f"INSERT INTO {table} ({columns}) VALUES "  # noqa: S608
            f"{', '.join([placeholders] * len(chunk))} RETURNING {pk}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            ids = [row[0] for row in cursor.fetchall()]
        # Both databases return the rows of a multi-row INSERT in the order given.
        for event, event_id in zip(chunk, ids, strict=True):
            event.pk = event_id
            event._state.adding = False
            event._state.db = connection.alias
    return events


# --- verifying ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Break:
    event_id: int | None  # the first event that does not hold; None: the chain's end
    seq: int
    why: str  # edited, deleted, inserted
    message: str


@dataclass
class Verification:
    checked: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoint: int = 0  # the place retention cut the chain at (0: never)
    breaks: list[Break] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.breaks


MAX_BREAKS = 20
VERIFY_CHUNK = 2000


def _chained(after: int) -> Iterator[AuditEvent]:
    """Events past place ``after`` in write order, a chunk at a time (never all in memory)."""
    while True:
        chunk = list(
            AuditEvent.objects.filter(chain_seq__gt=after).order_by("chain_seq")[:VERIFY_CHUNK]
        )
        yield from chunk
        if len(chunk) < VERIFY_CHUNK:
            return
        after = chunk[-1].chain_seq or after


def chain_verify(*, since: datetime | None = None) -> Verification:
    """Walk the chain (from ``since``, or from the latest retention checkpoint) and say
    where it does not hold: an event whose hash does not match its fields (edited), a gap in
    the places (deleted), an event with no place (inserted around the writer)."""
    result = Verification()
    checkpoint = AuditCheckpoint.objects.order_by("-seq").first()
    seq, previous = (checkpoint.seq, checkpoint.hash) if checkpoint else (0, GENESIS)
    result.checkpoint = seq
    if since is not None:
        start = (
            AuditEvent.objects.filter(created_at__gte=since, chain_seq__gt=seq)
            .order_by("chain_seq")
            .first()
        )
        if start is None or start.chain_seq is None:
            return result  # nothing written since then
        before = AuditEvent.objects.filter(chain_seq=start.chain_seq - 1).first()
        if before is not None:
            # Trusted as the starting point, as a checkpoint is.
            seq, previous = before.chain_seq or 0, before.chain_hash
    breaks = result.breaks
    for event in _chained(seq):
        place = event.chain_seq or 0
        if place != seq + 1:
            missing = f"#{seq + 1}" if place == seq + 2 else f"#{seq + 1}-#{place - 1}"
            breaks.append(
                Break(
                    event.pk,
                    place,
                    "deleted",
                    f"event {event.pk} (#{place}): the event(s) before it at {missing} "
                    "are missing (deleted)",
                )
            )
            previous = event.chain_hash  # go on from here, to find further breaks
        else:
            expected = link_hash(previous, place, event_values(event))
            if expected != event.chain_hash:
                breaks.append(
                    Break(
                        event.pk,
                        place,
                        "edited",
                        f"event {event.pk} (#{place}): its fields do not match its hash (edited)",
                    )
                )
            previous = event.chain_hash
        seq = place
        result.checked += 1
        result.first_seq = result.first_seq or place
        result.last_seq = place
        if len(breaks) >= MAX_BREAKS:
            return result
    head = AuditChain.objects.filter(pk=1).first()
    if since is None and head is not None and head.seq > seq:
        missing = f"#{seq + 1}" if head.seq == seq + 1 else f"#{seq + 1}-#{head.seq}"
        breaks.append(
            Break(
                None,
                seq + 1,
                "deleted",
                f"the last event(s) at {missing} are missing (deleted); the chain's head "
                f"is at #{head.seq}",
            )
        )
    for event in AuditEvent.objects.filter(chain_seq__isnull=True).order_by("id")[:MAX_BREAKS]:
        breaks.append(
            Break(
                event.pk,
                0,
                "inserted",
                f"event {event.pk}: it has no place in the chain (inserted around the writer)",
            )
        )
    return result


# --- retention ---------------------------------------------------------------------------
def chain_prune(*, cutoff: datetime, chunk: int) -> int:
    """Delete the chain's oldest whole segment: every event before the first one at or
    after ``cutoff`` in write order. A checkpoint (the segment's last place and hash) is
    recorded before anything goes, so verification starts after it even if the deletion is
    interrupted. Returns how many events went."""
    keep = (
        AuditEvent.objects.filter(created_at__gte=cutoff, chain_seq__isnull=False)
        .order_by("chain_seq")
        .values_list("chain_seq", flat=True)
        .first()
    )
    old = AuditEvent.objects.filter(created_at__lt=cutoff, chain_seq__isnull=False)
    if keep is not None:
        old = old.filter(chain_seq__lt=keep)
    last = old.order_by("-chain_seq").values_list("chain_seq", "chain_hash").first()
    if last is None:
        return 0
    through, through_hash = last
    deleted = 0
    with transaction.atomic():
        checkpoint, _ = AuditCheckpoint.objects.get_or_create(
            seq=through, defaults={"hash": through_hash}
        )
    while True:
        ids = list(
            AuditEvent.objects.filter(chain_seq__lte=through)
            .order_by("chain_seq")
            .values_list("id", flat=True)[:chunk]
        )
        if not ids:
            break
        deleted += AuditEvent.objects.filter(id__in=ids).prune()
    AuditCheckpoint.objects.filter(pk=checkpoint.pk).update(deleted=checkpoint.deleted + deleted)
    return deleted
