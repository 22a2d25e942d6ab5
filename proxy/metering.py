"""Reading usage out of responses as they stream by, without holding them.

Streamed answers are Server-Sent Events: ``message_start`` carries the model and the
first usage, each ``message_delta`` carries cumulative usage and the stop reason. Frames
may be split anywhere across chunks and end lines with ``\\n`` or ``\\r\\n``. A plain JSON
answer carries ``usage`` at the top level. Compressed bodies are metered on a decompressed
copy; the client always gets the upstream's bytes.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class Usage:
    model: str = ""
    stop_reason: str = ""
    tokens: dict[str, int] = field(default_factory=dict)
    error_type: str = ""

    def take(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for name in USAGE_FIELDS:
                value = usage.get(name)
                if isinstance(value, int):
                    self.tokens[name] = value


def _decoder(content_encoding: str) -> Any:
    encoding = content_encoding.strip().lower()
    if encoding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None


class UsageMeter:
    """Feed it every chunk of a response body; read ``usage`` at the end."""

    def __init__(self, *, content_type: str, content_encoding: str = "") -> None:
        self.usage = Usage()
        self._sse = content_type.startswith("text/event-stream")
        self._json = content_type.startswith("application/json")
        encoding = content_encoding.strip().lower()
        self._metered = encoding in {"", "identity", "gzip", "deflate"}
        self._decoder = _decoder(encoding)
        self._pending = b""
        self._event = b""
        self._data: list[bytes] = []
        self._body: list[bytes] = []
        self._body_size = 0

    def feed(self, chunk: bytes) -> None:
        if not self._metered or not (self._sse or self._json):
            return
        if self._decoder is not None:
            try:
                chunk = self._decoder.decompress(chunk)
            except zlib.error:
                self._metered = False
                return
        if self._sse:
            self._feed_sse(chunk)
        else:
            self._body_size += len(chunk)
            if self._body_size > JSON_METER_LIMIT:
                self._metered, self._body = False, []
            else:
                self._body.append(chunk)

    def finish(self) -> Usage:
        if self._json and self._metered and self._body:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                self._take_message(json.loads(b"".join(self._body)))
        if self._sse and self._pending:
            self._line(self._pending)  # a last line without its newline
            self._line(b"")
        return self.usage

    def _feed_sse(self, data: bytes) -> None:
        data = self._pending + data
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._dispatch()
            return
        if line.startswith(b"event:"):
            self._event = line[6:].strip()
        elif line.startswith(b"data:") and (not self._event or self._event in INTERESTING_EVENTS):
            self._data.append(line[5:].lstrip(b" "))

    def _dispatch(self) -> None:
        data, self._data, self._event = self._data, [], b""
        if not data:
            return
        try:
            event = json.loads(b"\n".join(data))
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(event, dict):
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
            error = event.get("error")
            if isinstance(error, dict):
                self.usage.error_type = str(error.get("type", "error"))

    def _take_message(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if isinstance(message.get("model"), str):
            self.usage.model = message["model"]
        if isinstance(message.get("stop_reason"), str):
            self.usage.stop_reason = message["stop_reason"]
        self.usage.take(message.get("usage"))
        error = message.get("error")
        if message.get("type") == "error" and isinstance(error, dict):
            self.usage.error_type = str(error.get("type", "error"))
