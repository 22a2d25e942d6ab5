"""What differs between upstream providers on the wire (issue 16): the shape of keybroker's
own error answers, the headers a call needs beside its credential, which calls are metered,
and which body fields ask for output tokens.

A backend's kind names its provider in broker/kinds.py, whose ``dialect`` picks one of the
``Wire``s here; everything else in the proxy is the same for every provider. Adding one is
docs/providers.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from broker.kinds import ANTHROPIC_VERSION, ProviderError, provider_for

Headers = list[tuple[bytes, bytes]]
# How a provider's answers are read (proxy/metering.py) and its errors written (here).
Dialect = Literal["anthropic", "openai"]

# OpenAI's error ``code`` for keybroker's answers where OpenAI has one of its own; SDKs
# raise by status, people and scripts read the code.
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


@dataclass(frozen=True)
class Wire:
    dialect: Dialect
    # Calls whose JSON body names a model and whose answer carries usage.
    metered_paths: tuple[str, ...]
    # Body fields that cap the output tokens, in the order they are read.
    max_tokens_fields: tuple[str, ...]
    # Calls that may write up to the model's limit when the body names no cap: under a
    # policy's max_tokens they must name one (Anthropic's calls always do).
    uncapped_by_default: tuple[str, ...] = ()
    # Sent upstream when the client did not send them.
    default_headers: tuple[tuple[bytes, bytes], ...] = ()

    def error_body(self, status: int, error_type: str, message: str) -> bytes:
        if self.dialect == "openai":
            error = {
                "message": message,
                "type": error_type,
                "param": None,
                "code": _OPENAI_CODES.get(status),
            }
            return json.dumps({"error": error}).encode()
        return json.dumps(
            {"type": "error", "error": {"type": error_type, "message": message}}
        ).encode()

    def stream_error_frame(self, error_body: bytes) -> bytes:
        """An error that ends an SSE stream between two events, as the SDKs read one."""
        if self.dialect == "openai":
            return b"data: " + error_body + b"\n\n"
        return b"event: error\ndata: " + error_body + b"\n\n"

    def with_defaults(self, headers: Headers) -> Headers:
        present = {name for name, _ in headers}
        return headers + [
            (name, value) for name, value in self.default_headers if name not in present
        ]

    def max_tokens(self, payload: dict[str, object]) -> object:
        """The body's output cap under whichever name this provider reads, or None."""
        for name in self.max_tokens_fields:
            if name in payload:
                return payload[name]
        return None


ANTHROPIC = Wire(
    dialect="anthropic",
    metered_paths=("/v1/messages",),
    max_tokens_fields=("max_tokens",),
    default_headers=((b"anthropic-version", ANTHROPIC_VERSION.encode()),),
)
OPENAI = Wire(
    dialect="openai",
    metered_paths=("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions"),
    # Chat completions: max_completion_tokens (max_tokens is its deprecated name);
    # Responses: max_output_tokens.
    max_tokens_fields=("max_completion_tokens", "max_tokens", "max_output_tokens"),
    uncapped_by_default=("/v1/chat/completions", "/v1/responses", "/v1/completions"),
)
WIRES: dict[str, Wire] = {wire.dialect: wire for wire in (ANTHROPIC, OPENAI)}


def wire_for(kind: str) -> Wire:
    """The wire of a backend kind; Anthropic's for a kind nobody knows."""
    try:
        return WIRES[provider_for(kind).dialect]
    except (ProviderError, KeyError):
        return ANTHROPIC
