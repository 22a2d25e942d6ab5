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

OpenAI's answers (``dialect="openai"``) are read the same way, in OpenAI's words: a JSON
answer's ``usage`` (chat completions, Responses, embeddings), a chat completions stream's
data-only chunks (usage only in the last one, and only when the client asked for
``stream_options.include_usage``), and a Responses stream's ``response.completed`` (or
``.failed``, ``.incomplete``) event. Their usage is stored under the Anthropic names, so
policy and audit read every provider alike (Usage.take_openai).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.providers import Dialect

USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Enough for any messages response; larger JSON bodies (file listings, downloads) are
# passed through unmetered rather than held.
JSON_METER_LIMIT = 4 * 1024 * 1024
INTERESTING_EVENTS = {b"message_start", b"message_delta", b"error"}
# A Responses stream's events that carry the final usage; chat completions streams have no
# event names at all.
OPENAI_INTERESTING_EVENTS = {
    b"response.completed",
    b"response.failed",
    b"response.incomplete",
    b"error",
}
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
# A whole frame of an event that carries no usage (pings, content deltas: nearly all of a
# stream), dropped in one regex pass before any line reaches Python.
_QUIET_FRAME = re.compile(
    rb"^event:[ ]*+(?!(?:message_start|message_delta|error)[ \t]*\r?\n)[^\r\n]*\r?\n"
    rb"(?:data:[^\r\n]*\r?\n)*+\r?\n",
    re.MULTILINE,
)
# What makes an OpenAI data line worth parsing: a usage object (not ``"usage": null``, which
# every chunk carries once include_usage is set), a finish reason, or an error. Inside a JSON
# string the quotes would be escaped, so text or tool arguments cannot match.
_OPENAI_CARRIES = rb'"(?:usage"\s*+:\s*+\{|finish_reason"\s*+:\s*+"|error"\s*+:\s*+\{)'
_OPENAI_WANTED_DATA = re.compile(_OPENAI_CARRIES)
# _QUIET_FRAME for OpenAI: a Responses event that carries no usage (output_text.delta and the
# like), or a chat chunk that carries none of the above. A chunk has no event line to tell
# where its frame starts, so it is dropped only after a blank line: a data line at the start
# of a chunk's whole lines may continue the frame before it (it then reaches Python, which
# filters it with _OPENAI_WANTED_DATA).
_OPENAI_QUIET_FRAME = re.compile(
    rb"^event:[ ]*+(?!(?:response\.completed|response\.failed|response\.incomplete|error)"
    rb"[ \t]*\r?\n)[^\r\n]*\r?\n(?:data:[^\r\n]*\r?\n)*+\r?\n"
    rb"|^(?:(?<=\n\n)|(?<=\n\r\n))data:(?![^\r\n]*?" + _OPENAI_CARRIES + rb")[^\r\n]*+\r?\n\r?\n",
    re.MULTILINE,
)
_JSONL_LINE = re.compile(rb"^[ \t\r]*\S[^\n]*", re.MULTILINE)
_RESULT_TYPE = re.compile(rb'"result"\s*:\s*\{\s*"type"\s*:\s*"([a-z_]{1,40})"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,100})"')
_STATUS = re.compile(rb'"status"\s*:\s*"([a-z_]{1,40})"')
# ``usage`` holds flat counters and objects one level deep (cache_creation,
# server_tool_use); inside a JSON string its quotes would be escaped, so it cannot match.
_USAGE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')


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
        if isinstance(usage, dict):
            for name in USAGE_FIELDS:
                value = usage.get(name)
                if isinstance(value, int):
                    self.tokens[name] = value

    def add(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for name in USAGE_FIELDS:
                value = usage.get(name)
                if isinstance(value, int):
                    self.tokens[name] = self.tokens.get(name, 0) + value

    def take_openai(self, usage: Any) -> None:
        """OpenAI's usage under the Anthropic names: chat completions and embeddings say
        ``prompt_tokens``/``completion_tokens``, Responses ``input_tokens``/``output_tokens``.
        """
        if not isinstance(usage, dict):
            return
        if isinstance(usage.get("prompt_tokens"), int):
            # Embeddings have no completion_tokens: they write nothing.
            prompt, output = usage["prompt_tokens"], usage.get("completion_tokens", 0)
            details = usage.get("prompt_tokens_details")
        elif isinstance(usage.get("input_tokens"), int):
            prompt, output = usage["input_tokens"], usage.get("output_tokens")
            details = usage.get("input_tokens_details")
        else:
            return
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        # OpenAI's prompt count includes its cache hits; Anthropic's input_tokens excludes
        # them (cache_read_input_tokens is apart), and policy and audit add the fields up.
        # So the hits move to cache_read_input_tokens and input_tokens keeps the rest: the
        # sum stays what OpenAI bills as prompt + completion, and the audit's cache column
        # means the same for both providers. Hits above the prompt are not believed.
        if isinstance(cached, int):
            cached = min(max(cached, 0), max(prompt, 0))
            self.tokens["input_tokens"] = prompt - cached
            self.tokens["cache_read_input_tokens"] = cached
        else:
            self.tokens["input_tokens"] = prompt
        if isinstance(output, int):
            self.tokens["output_tokens"] = output


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
    the provider whose wire format the body is in (broker/kinds.py's dialect); OpenAI's
    batch results are not read (``jsonl`` is Anthropic's).
    """

    def __init__(
        self,
        *,
        content_type: str,
        content_encoding: str = "",
        jsonl: bool = False,
        dialect: Dialect = "anthropic",
    ) -> None:
        self.usage = Usage()
        self._openai = dialect == "openai"
        self._interesting = OPENAI_INTERESTING_EVENTS if self._openai else INTERESTING_EVENTS
        self._quiet_frame = _OPENAI_QUIET_FRAME if self._openai else _QUIET_FRAME
        self._typed_events = False  # an OpenAI stream with event names: the Responses API
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
            if self._openai:
                self._take_openai(body)
            else:
                self._take_message(body)
        elif self._kind in {"sse", "jsonl"}:
            if self._parts or self._long is not None:
                self._end_line()  # a last line without its newline
            if self._kind == "sse":
                self._line(b"")
            if self._kind == "sse" and self._openai and self._active and not self.usage.tokens:
                self._stop(self._why_no_usage())

    def _why_no_usage(self) -> str:
        if self.usage.error_type:
            return "the stream ended in an error without usage"
        if self._long_chunk_unread:
            return f"the stream carried no usage (a line over {LINE_LIMIT // 2**20} MB not read)"
        if self._typed_events:
            return "the stream carried no usage (no response.completed event)"
        return "the stream carried no usage (stream_options.include_usage not set)"

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
            if self._openai and not self._typed_events:
                self._typed_events = data.startswith(b"event:", start) or (
                    data.find(b"\nevent:", start, end) >= 0
                )
            data = self._quiet_frame.sub(b"", data[start:end])
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
        elif line.startswith(b"data:") and self._event and self._event not in self._interesting:
            self._skipping = True  # a huge text delta, say: it carries no usage
        elif line.startswith(b"data:") and self._openai:
            # A chat chunk (no event name) or a Responses final event can hold a whole
            # answer; their usage ends them, their model leads: keep the two ends.
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
            self._typed_events = True
        elif line.startswith(b"data:") and self._wanted(line):
            data = line[5:].lstrip(b" ")
            self._data_size += len(data) + 1  # empty data lines must count too
            if self._data_size > LINE_LIMIT:
                self._stop(f"an event over {LINE_LIMIT // 2**20} MB")
            else:
                self._data.append(data)

    def _wanted(self, line: bytes) -> bool:
        if self._event:
            return self._event in self._interesting
        # A chat chunk that the quiet-frame regex did not see whole (split across chunks).
        return not self._openai or _OPENAI_WANTED_DATA.search(line) is not None

    def _dispatch(self) -> None:
        data, self._data, self._data_size, self._event = self._data, [], 0, b""
        if not data:
            return
        try:
            event = json.loads(b"\n".join(data))
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(event, dict):
            return
        if self._openai:
            self._openai_event(event)
            return
        kind = event.get("type")
        if kind == "message_start":
            self._take_message(event.get("message"))
        elif kind == "message_delta":
            self.usage.take(event.get("usage"))
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self.usage.stop_reason = delta["stop_reason"]
        elif kind == "error":
            self._take_error(event)

    def _take_message(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if isinstance(message.get("model"), str):
            self.usage.model = message["model"]
        if isinstance(message.get("stop_reason"), str):
            self.usage.stop_reason = message["stop_reason"]
        self.usage.take(message.get("usage"))
        if message.get("type") == "error":
            self._take_error(message)

    def _take_error(self, payload: dict[str, Any]) -> None:
        error = payload.get("error")
        if isinstance(error, dict):
            if self._openai:  # a type, a code or both (a failed response has only a code)
                kind = error.get("type") or error.get("code") or "error"
            else:
                kind = error.get("type", "error")
            self.usage.error_type = str(kind)[:100]

    def _openai_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in {"response.completed", "response.failed", "response.incomplete"}:
            self._take_openai(event.get("response"))
        elif kind == "error" and not isinstance(event.get("error"), dict):
            # A Responses stream's error event: its fields are at the top level, and its
            # type is the event's.
            self.usage.error_type = str(event.get("code") or "error")[:100]
        else:  # a chat completions chunk, or the error frame that ends a chat stream
            self._take_openai(event)

    def _take_openai(self, body: Any) -> None:
        """A chat completion, a response, an embeddings answer, a chunk or an error."""
        if not isinstance(body, dict):
            return
        if isinstance(body.get("model"), str):
            self.usage.model = body["model"][:100]
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            if isinstance(choices[0].get("finish_reason"), str):
                self.usage.stop_reason = choices[0]["finish_reason"]
        elif isinstance(body.get("status"), str) and body.get("object") == "response":
            # "incomplete" says less than why (max_output_tokens, content_filter).
            details = body.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            self.usage.stop_reason = reason if isinstance(reason, str) else body["status"]
        self.usage.take_openai(body.get("usage"))
        self._take_error(body)

    def _long_event(self, head: bytes, tail: bytes) -> None:
        """An OpenAI data line too long to hold: a huge chunk or a Responses final event."""
        found = list(_USAGE.finditer(tail))
        try:
            usage = json.loads(found[-1].group(1)) if found else None
        except (ValueError, UnicodeDecodeError):
            usage = None
        if usage is None:
            if self._event:  # a final event whose usage cannot be read: say so
                self._stop(f"a long {self._event.decode('latin-1')[:40]} without readable usage")
            self._long_chunk_unread = True  # text, if the usage comes later
            return
        self.usage.take_openai(usage)
        model = _MODEL.search(head)
        if model:
            self.usage.model = model.group(1).decode("utf-8", "replace")
        status = _STATUS.search(head) if self._event else None
        if status:
            self.usage.stop_reason = status.group(1).decode()

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
                self._take_error(record)
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
        found = list(_USAGE.finditer(tail))
        try:
            usage = json.loads(found[-1].group(1))
        except (IndexError, ValueError, UnicodeDecodeError):
            self._stop("a long succeeded batch result without readable usage")
            return
        self.usage.add(usage)
        model = _MODEL.search(head)
        self._add_model(model.group(1).decode("utf-8", "replace") if model else None)

    def _add_model(self, model: Any) -> None:
        if isinstance(model, str) and model and len(self._models) < BATCH_MODELS_LIMIT:
            self._models.add(model[:100])
