"""Reading usage out of responses as they stream by, without holding them.

Streamed answers are Server-Sent Events: ``message_start`` carries the model and the
first usage, each ``message_delta`` carries cumulative usage and the stop reason. Frames
may be split anywhere across chunks and end lines with ``\\n`` or ``\\r\\n``. A plain JSON
answer carries ``usage`` at the top level. A message batch's results are JSON Lines, one
result per request, whose succeeded messages' usage adds up. Compressed bodies are metered
on a decompressed copy; the client always gets the upstream's bytes.

The upstream is not trusted to be small or well formed: the meter decompresses in bounded
steps, keeps at most ``LINE_LIMIT`` of a line and ``DECODED_LIMIT`` of decompressed body,
and when it cannot read the usage it says why in ``Usage.unmetered`` instead of raising.
Forwarding never depends on it.

What an answer's JSON and events mean is the provider's (``Wire.read_answer``,
``read_event``, ``read_error``, in proxy/providers/); this module reads bodies into them
within its bounds, the same for every provider. A message batch's results (JSON Lines,
``jsonl=True``) are Anthropic's.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any, Literal

from proxy.providers import ANTHROPIC, WIRES
from proxy.providers.base import MODEL_FIELD, USAGE_OBJECT, Usage

# Enough for any messages response; larger JSON bodies (file listings, downloads) are
# passed through unmetered rather than held.
JSON_METER_LIMIT = 4 * 1024 * 1024
# Codings the meter can decompress; a client's Accept-Encoding is cut down to these
# (meterable_accept_encoding) so that the upstream's answer stays readable.
METERABLE_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})
# One decompression step's output: what a hostile chunk can cost in memory at once.
DECODE_STEP = 256 * 1024
# A gzip bomb is cut off here; honest compressed answers are far smaller (JSON is held to
# JSON_METER_LIMIT anyway, and an SSE stream of 128k output tokens is a few MB).
DECODED_LIMIT = 16 * 1024 * 1024
# Longest SSE or JSONL line kept whole. SSE frames are small; a batch result line holds a
# whole message, so one over the limit is read from its two ends (LONG_LINE_ENDS each).
LINE_LIMIT = 1024 * 1024
LONG_LINE_ENDS = 8 * 1024
# SSE lines looked at per body: an honest stream of 128k output tokens has a few hundred
# thousand. A batch has at most 100,000 requests, so as many results lines.
LINE_BUDGET = 1_000_000
RESULTS_LIMIT = 100_000
# Distinct models named in one batch's results; past that they are not listed.
BATCH_MODELS_LIMIT = 8

# SSE lines that carry usage, or a run of blank lines (dispatch once, the rest are no-ops);
# comments, ids and other fields are skipped inside the regex engine.
# The repeated groups are possessive (++, *+): a greedy one keeps backtracking state for
# each line it repeats over, about 120 bytes a line, so a chunk of blank lines (or a frame
# of empty data lines) cost a hundred times its size in memory (tests/faults).
_SSE_LINE = re.compile(rb"^((?:event|data):[^\r\n]*)\r?\n|^(?:\r?\n)++", re.MULTILINE)
_JSONL_LINE = re.compile(rb"^[ \t\r]*\S[^\n]*", re.MULTILINE)
_RESULT_TYPE = re.compile(rb'"result"\s*:\s*\{\s*"type"\s*:\s*"([a-z_]{1,40})"')


def meterable_accept_encoding(value: bytes | None) -> bytes:
    """A client's ``Accept-Encoding`` cut down to the codings the meter decompresses.

    The proxy sends this upstream instead of the client's own, so an answer in a coding
    the meter cannot read (br, zstd) is never asked for. Kept entries keep their q-values;
    when none acceptable is left the answer is ``identity``.
    """
    kept: list[bytes] = []
    acceptable = False
    for item in (value or b"").split(b","):
        coding, _, params = item.partition(b";")
        if coding.strip().lower().decode("latin-1") not in METERABLE_CODINGS:
            continue  # "*" too: it would let the upstream pick br
        quality = _quality(params)
        if quality is None:
            continue
        kept.append(item.strip())
        acceptable = acceptable or quality > 0
    return b", ".join(kept) if acceptable else b"identity"


def _quality(params: bytes) -> float | None:
    """The q-value of one Accept-Encoding entry; None when it is malformed."""
    quality = 1.0
    for param in params.split(b";"):
        name, _, raw = param.partition(b"=")
        if name.strip().lower() == b"q":
            try:
                quality = float(raw.strip())
            except ValueError:
                return None
            if not 0 <= quality <= 1:
                return None
    return quality


def _decoder(coding: str) -> Any:
    if coding in {"gzip", "x-gzip"}:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return zlib.decompressobj()
    return None


class UsageMeter:
    """Feed it every chunk of a response body; read ``usage`` at the end.

    ``jsonl=True`` reads the body as a message batch's results whatever its content type
    (Anthropic serves them as application/binary or application/x-jsonl). ``dialect`` is
    the provider whose wire format the body is in (broker/kinds.py's dialect, a name in
    proxy/providers' WIRES); batch results are Anthropic's.
    """

    def __init__(
        self,
        *,
        content_type: str,
        content_encoding: str = "",
        jsonl: bool = False,
        dialect: str = ANTHROPIC.dialect,
    ) -> None:
        self.usage = Usage()
        self._wire = WIRES[dialect]
        self._named_events = False  # the stream names its events (not OpenAI's chat chunks)
        self._long_chunk_unread = False
        self._kind: Literal["sse", "json", "jsonl", ""] = (
            "jsonl"
            if jsonl
            else "sse"
            if content_type.startswith("text/event-stream")
            else "json"
            if content_type.startswith("application/json")
            else ""
        )
        # Metering goes on until it is done or cannot go on; then feed() is a no-op.
        self._active = bool(self._kind)
        self._finished = False
        codings = [
            coding
            for coding in (part.strip().lower() for part in content_encoding.split(","))
            if coding and coding != "identity"
        ]
        self._coding = codings[0] if len(codings) == 1 else ""
        self._decoder = _decoder(self._coding)
        self._decoded = 0
        if codings and self._decoder is None and self._active:
            self._stop(f"content-encoding {content_encoding.strip()[:40]} not readable")
        # A line in the making, as parts: joining them once per line keeps it linear.
        self._parts: list[bytes] = []
        self._part_size = 0
        self._skipping = False  # inside an over-long line that carries no usage
        self._long: tuple[bytes, bytes] | None = None  # an over-long JSONL line's two ends
        self._event = b""
        self._data: list[bytes] = []
        self._data_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._models: set[str] = set()
        self._lines_seen = 0

    def feed(self, chunk: bytes) -> None:
        if not self._active or not chunk:
            return
        try:
            if self._decoder is None:
                self._take(chunk)
            else:
                self._decode(chunk)
        except Exception as exc:  # a meter bug must never break forwarding
            self._stop(f"meter failed ({type(exc).__name__})")

    def finish(self) -> Usage:
        if self._finished:
            return self.usage
        self._finished = True
        try:
            self._finish()
        except Exception as exc:  # as in feed()
            self._stop(f"meter failed ({type(exc).__name__})")
        if self._kind == "jsonl" and self._models:
            self.usage.model = ",".join(sorted(self._models))[:100]
        return self.usage

    def _finish(self) -> None:
        if not self._active:
            return
        if self._kind == "json" and self._body:
            try:
                body = json.loads(b"".join(self._body))
            except (ValueError, UnicodeDecodeError):
                self._stop("json body not readable")
                return
            self._wire.read_answer(self.usage, body)
        elif self._kind in {"sse", "jsonl"}:
            if self._parts or self._long is not None:
                self._end_line()  # a last line without its newline
            if self._kind == "sse":
                self._line(b"")
            if self._kind == "sse" and self._active and not self.usage.tokens:
                reason = self._wire.unmetered_stream(self.usage, named_events=self._named_events)
                if reason:
                    self._stop(self._why_no_usage(reason))

    def _why_no_usage(self, reason: str) -> str:
        if self.usage.error_type:
            return "the stream ended in an error without usage"
        if self._long_chunk_unread:
            return f"the stream carried no usage (a line over {LINE_LIMIT // 2**20} MB not read)"
        return reason

    def _stop(self, reason: str) -> None:
        self._active = False
        self._parts, self._data, self._body, self._long = [], [], [], None
        if not self.usage.unmetered:
            self.usage.unmetered = reason

    def _decode(self, data: bytes) -> None:
        """Decompress in bounded steps, so a bomb costs DECODE_STEP at a time and stops."""
        while self._active:
            try:
                out = self._decoder.decompress(data, DECODE_STEP)
            except zlib.error:
                self._stop(f"content-encoding {self._coding} corrupt")
                return
            self._decoded += len(out)
            if self._decoded > DECODED_LIMIT:
                self._stop(f"over {DECODED_LIMIT // 2**20} MB decompressed")
                return
            self._take(out)
            if self._decoder.unconsumed_tail:
                data = self._decoder.unconsumed_tail
            elif self._decoder.eof:
                data = self._decoder.unused_data
                if not data:
                    return
                if self._coding == "deflate":
                    self._stop("content-encoding deflate: data after the end")
                    return
                # gzip allows several members one after the other; clients read them all.
                self._decoder = _decoder(self._coding)
            else:
                return

    def _take(self, data: bytes) -> None:
        if self._kind == "json":
            self._body_size += len(data)
            if self._body_size > JSON_METER_LIMIT:
                self._stop(f"json body over {JSON_METER_LIMIT // 2**20} MB")
            else:
                self._body.append(data)
            return
        first = data.find(b"\n")
        if first < 0:
            self._extend(data)
            return
        self._extend(data[:first])
        self._end_line()  # the line held from earlier chunks
        last = data.rfind(b"\n")
        if self._active and last > first:
            self._whole_lines(data, first + 1, last + 1)
        if self._active:
            self._extend(data[last + 1 :])

    def _whole_lines(self, data: bytes, start: int, end: int) -> None:
        """The lines that matter between start and end, found by the regex engine.

        Python looks only at the lines a regex picks (SSE fields that carry usage, one per
        run of blank lines; JSONL lines that are not blank), and at most ``LINE_BUDGET`` of
        them: a body of short lines must not cost a Python call per byte.
        """
        if self._kind == "jsonl":
            pattern = _JSONL_LINE
        else:
            pattern = _SSE_LINE
            if not self._named_events:
                self._named_events = data.startswith(b"event:", start) or (
                    data.find(b"\nevent:", start, end) >= 0
                )
            data = self._wire.quiet_frame.sub(b"", data[start:end])
            start, end = 0, len(data)
        for match in pattern.finditer(data, start, end):
            self._lines_seen += 1
            budget = RESULTS_LIMIT if self._kind == "jsonl" else LINE_BUDGET
            if self._lines_seen > budget:
                self._stop(f"over {budget} lines")
                return
            if self._kind == "jsonl":
                self._result(match.group(0))
            else:
                self._line(match.group(1) or b"")
            if not self._active:
                return

    def _extend(self, piece: bytes) -> None:
        if not piece or self._skipping:
            return
        if self._long is not None:
            head, tail = self._long
            self._long = (head, (tail + piece)[-LONG_LINE_ENDS:])
            return
        self._parts.append(piece)
        self._part_size += len(piece)
        if self._part_size > LINE_LIMIT:
            line = b"".join(self._parts)
            self._parts, self._part_size = [], 0
            self._overlong(line)

    def _overlong(self, line: bytes) -> None:
        if self._kind == "jsonl":
            self._long = (line[:LONG_LINE_ENDS], line[-LONG_LINE_ENDS:])
        elif (
            line.startswith(b"data:") and self._event and self._event not in self._wire.usage_events
        ):
            self._skipping = True  # a huge text delta, say: it carries no usage
        elif line.startswith(b"data:") and self._wire.long_data_has_usage:
            # A chunk (no event name) or a final event can hold a whole answer; their
            # usage ends them, their model leads: keep the two ends.
            self._long = (line[:LONG_LINE_ENDS], line[-LONG_LINE_ENDS:])
        else:
            self._stop(f"a line over {LINE_LIMIT // 2**20} MB")

    def _end_line(self) -> None:
        if self._skipping:
            self._skipping = False
            return
        if self._long is not None:
            head, tail = self._long
            self._long = None
            if self._kind == "jsonl":
                self._long_result(head, tail)
            else:
                self._long_event(head, tail)
            return
        line = b"".join(self._parts)
        self._parts, self._part_size = [], 0
        if self._kind == "jsonl":
            self._result(line)
        else:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._dispatch()
            return
        if line.startswith(b"event:"):
            self._event = line[6:].strip()
            self._named_events = True
        elif line.startswith(b"data:") and self._wanted(line):
            data = line[5:].lstrip(b" ")
            self._data_size += len(data) + 1  # empty data lines must count too
            if self._data_size > LINE_LIMIT:
                self._stop(f"an event over {LINE_LIMIT // 2**20} MB")
            else:
                self._data.append(data)

    def _wanted(self, line: bytes) -> bool:
        if self._event:
            return self._event in self._wire.usage_events
        return self._wire.wants_unnamed_data(line)

    def _dispatch(self) -> None:
        data, self._data, self._data_size, self._event = self._data, [], 0, b""
        if not data:
            return
        try:
            event = json.loads(b"\n".join(data))
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(event, dict):
            self._wire.read_event(self.usage, event)

    def _long_event(self, head: bytes, tail: bytes) -> None:
        """A data line too long to hold, read by the provider from its two ends."""
        if self._wire.read_long_data(self.usage, head, tail, event=self._event):
            return
        if self._event:  # a final event whose usage cannot be read: say so
            self._stop(f"a long {self._event.decode('latin-1')[:40]} without readable usage")
        self._long_chunk_unread = True  # text, if the usage comes later

    def _result(self, line: bytes) -> None:
        """One line of batch results: ``{"custom_id": …, "result": {"type": …, …}}``."""
        line = line.strip()
        if not line:
            return
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self._stop("a batch results line is not JSON")
            return
        if not isinstance(record, dict):
            self._stop("a batch results line is not an object")
            return
        result = record.get("result")
        if not isinstance(result, dict):
            if record.get("type") == "error":  # the whole answer is an error
                self._wire.read_error(self.usage, record)
            else:
                self._stop("a batch results line without a result")
            return
        self.usage.requests += 1
        if result.get("type") != "succeeded":
            return  # errored, canceled and expired requests are not billed
        message = result.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        if not isinstance(usage, dict):
            self._stop("a succeeded batch result without usage")
            return
        self.usage.add(usage)
        self._add_model(message.get("model") if isinstance(message, dict) else None)

    def _long_result(self, head: bytes, tail: bytes) -> None:
        """A result line too long to hold: its type and model lead, its usage ends it."""
        kind = _RESULT_TYPE.search(head)
        if kind is None:
            self._stop(f"a batch results line over {LINE_LIMIT // 2**20} MB")
            return
        self.usage.requests += 1
        if kind.group(1) != b"succeeded":
            return
        found = list(USAGE_OBJECT.finditer(tail))
        try:
            usage = json.loads(found[-1].group(1))
        except (IndexError, ValueError, UnicodeDecodeError):
            self._stop("a long succeeded batch result without readable usage")
            return
        self.usage.add(usage)
        model = MODEL_FIELD.search(head)
        self._add_model(model.group(1).decode("utf-8", "replace") if model else None)

    def _add_model(self, model: Any) -> None:
        if isinstance(model, str) and model and len(self._models) < BATCH_MODELS_LIMIT:
            self._models.add(model[:100])
