"""What every provider module defines (issue 16): a ``Wire``, the part of the proxy that
differs between upstream APIs, and the ``Usage`` its reading fills."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from broker.prices import CACHE_WRITE_1H

# The names usage is kept under, whoever the provider: Anthropic's. Policy and the audit
# trail add them up, so a provider maps its counts onto them with the sum it bills.
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


# Fields found in the two ends of a JSON line too long to parse. ``usage`` holds flat
# counters and objects one level deep (cache_creation, server_tool_use); inside a JSON
# string the quotes would be escaped, so text cannot match any of these.
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
MODEL_FIELD = re.compile(rb'"model"\s*:\s*"([^"\\]{1,100})"')
STATUS_FIELD = re.compile(rb'"status"\s*:\s*"([a-z_]{1,40})"')


@dataclass
class Usage:
    model: str = ""
    stop_reason: str = ""
    tokens: dict[str, int] = field(default_factory=dict)
    error_type: str = ""
    # Why the usage could not be (fully) read, e.g. "content-encoding br not readable";
    # empty when it was. ``tokens`` then holds only what was read before.
    unmetered: str = ""
    # Batch results only: how many result lines (requests) the body had.
    requests: int = 0

    def take(self, usage: Any) -> None:
        """Counters already under USAGE_FIELDS' names, replacing what was read before."""
        for name, value in _counters(usage):
            self.tokens[name] = value

    def add(self, usage: Any) -> None:
        for name, value in _counters(usage):
            self.tokens[name] = self.tokens.get(name, 0) + value


def _counters(usage: Any) -> list[tuple[str, int]]:
    if not isinstance(usage, dict):
        return []
    found = [(name, usage[name]) for name in USAGE_FIELDS if isinstance(usage.get(name), int)]
    # Of the cache writes, those kept an hour cost more than those kept five minutes
    # (Anthropic's ``cache_creation`` split); priced apart, never counted twice.
    split = usage.get("cache_creation")
    if isinstance(split, dict) and isinstance(split.get("ephemeral_1h_input_tokens"), int):
        found.append((CACHE_WRITE_1H, split["ephemeral_1h_input_tokens"]))
    return found


@dataclass(frozen=True)
class Wire:
    """A provider's wire format, as far as the proxy needs it. A provider module makes one
    (a subclass, for the methods it reads and writes differently) and proxy/providers
    registers it under its ``dialect``, the name broker/kinds.py's Provider gives."""

    dialect: str
    # Calls whose JSON body names a model and whose answer carries usage.
    metered_paths: tuple[str, ...]
    # Body fields that cap the output tokens, in the order they are read.
    max_tokens_fields: tuple[str, ...]
    # SSE events whose data carries usage, a model or an error. Every other event's frame is
    # dropped by ``quiet_frame`` before Python looks at it.
    usage_events: frozenset[bytes]
    # A whole SSE frame that carries none of that (nearly all of a stream): one regex pass
    # drops them. Possessive repeats only: see proxy/metering.py's _SSE_LINE.
    quiet_frame: re.Pattern[bytes]
    # Calls that may write up to the model's limit when the body names no cap: under a
    # policy's max_tokens they must name one.
    uncapped_by_default: tuple[str, ...] = ()
    # Sent upstream when the client did not send them.
    default_headers: tuple[tuple[bytes, bytes], ...] = ()
    # An over-long data line without an event name may end in usage (a chunk holding a
    # whole answer): the meter keeps its two ends for ``read_long_data``. Otherwise such a
    # line stops the metering.
    long_data_has_usage: bool = False

    # --- keybroker's own answers, in the provider's shape -----------------------------
    def error_body(self, status: int, error_type: str, message: str) -> bytes:
        raise NotImplementedError

    def stream_error_frame(self, error_body: bytes) -> bytes:
        """An error that ends an SSE stream between two events, as the SDKs read one."""
        raise NotImplementedError

    def max_tokens(self, payload: dict[str, object]) -> object:
        """The body's output cap under whichever name this provider reads, or None."""
        for name in self.max_tokens_fields:
            if name in payload:
                return payload[name]
        return None

    # --- reading usage (proxy/metering.py calls these; bounds are the meter's) ----------
    def read_answer(self, usage: Usage, body: Any) -> None:
        """A JSON answer, whole."""
        raise NotImplementedError

    def read_event(self, usage: Usage, event: dict[str, Any]) -> None:
        """One SSE event's data: an event in ``usage_events``, or a frame without a name."""
        raise NotImplementedError

    def read_error(self, usage: Usage, payload: dict[str, Any]) -> None:
        """An error answer or event: its type into ``usage.error_type``."""
        raise NotImplementedError

    def wants_unnamed_data(self, line: bytes) -> bool:
        """Whether a data line outside any named event is worth parsing."""
        return True

    def read_long_data(self, usage: Usage, head: bytes, tail: bytes, *, event: bytes) -> bool:
        """A data line too long to hold, from its two ends; False when no usage was read."""
        return False

    def unmetered_stream(self, usage: Usage, *, named_events: bool) -> str:
        """Why a stream that ended without usage is unmetered, or "" when that is normal."""
        return ""
