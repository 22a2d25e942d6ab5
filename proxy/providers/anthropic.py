"""Anthropic's Messages API on the wire: kinds `anthropic` and `anthropic-wif`.

A JSON answer carries ``usage`` at the top level. A stream is Server-Sent Events:
``message_start`` carries the model and the first usage, each ``message_delta``
cumulative usage and the stop reason, ``error`` an error. Anthropic's usage is already in
the names keybroker keeps (proxy/providers/base.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from broker.kinds import ANTHROPIC_VERSION
from proxy.providers.base import Usage, Wire


@dataclass(frozen=True)
class AnthropicWire(Wire):
    def error_body(self, status: int, error_type: str, message: str) -> bytes:
        return json.dumps(
            {"type": "error", "error": {"type": error_type, "message": message}}
        ).encode()

    def stream_error_frame(self, error_body: bytes) -> bytes:
        return b"event: error\ndata: " + error_body + b"\n\n"

    def read_answer(self, usage: Usage, body: Any) -> None:
        if not isinstance(body, dict):
            return
        if isinstance(body.get("model"), str):
            usage.model = body["model"]
        if isinstance(body.get("stop_reason"), str):
            usage.stop_reason = body["stop_reason"]
        usage.take(body.get("usage"))
        if body.get("type") == "error":
            self.read_error(usage, body)

    def read_event(self, usage: Usage, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.read_answer(usage, event.get("message"))
        elif kind == "message_delta":
            usage.take(event.get("usage"))
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                usage.stop_reason = delta["stop_reason"]
        elif kind == "error":
            self.read_error(usage, event)

    def read_error(self, usage: Usage, payload: dict[str, Any]) -> None:
        error = payload.get("error")
        if isinstance(error, dict):
            usage.error_type = str(error.get("type", "error"))[:100]


ANTHROPIC = AnthropicWire(
    dialect="anthropic",
    metered_paths=("/v1/messages",),
    max_tokens_fields=("max_tokens",),
    usage_events=frozenset({b"message_start", b"message_delta", b"error"}),
    quiet_frame=re.compile(
        rb"^event:[ ]*+(?!(?:message_start|message_delta|error)[ \t]*\r?\n)[^\r\n]*\r?\n"
        rb"(?:data:[^\r\n]*\r?\n)*+\r?\n",
        re.MULTILINE,
    ),
    default_headers=((b"anthropic-version", ANTHROPIC_VERSION.encode()),),
)
