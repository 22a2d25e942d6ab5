"""OpenAI's API on the wire: kind `openai`.

A JSON answer carries ``usage`` (chat completions, Responses, embeddings). A chat
completions stream is data-only chunks, usage only in the last one and only when the
client asked for ``stream_options.include_usage``; a Responses stream has typed events,
its usage in ``response.completed`` (or ``.failed``, ``.incomplete``). OpenAI's counts
are kept under Anthropic's names (``take_usage``), so policy and audit read every
provider alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from proxy.providers.base import (
    MODEL_FIELD,
    STATUS_FIELD,
    USAGE_OBJECT,
    Usage,
    Wire,
)

# OpenAI's error ``code`` for keybroker's answers where OpenAI has one of its own; SDKs
# raise by status, people and scripts read the code.
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
_FINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete"})
# What makes a data line worth parsing: a usage object (not ``"usage": null``, which every
# chunk carries once include_usage is set), a finish reason, or an error. Inside a JSON
# string the quotes would be escaped, so text or tool arguments cannot match.
_CARRIES = rb'"(?:usage"\s*+:\s*+\{|finish_reason"\s*+:\s*+"|error"\s*+:\s*+\{)'
_WANTED_DATA = re.compile(_CARRIES)
# A Responses event that carries no usage (output_text.delta and the like), or a chat chunk
# that carries none of the above. A chunk has no event line to tell where its frame starts,
# so it is dropped only after a blank line: a data line at the start of a chunk's whole
# lines may continue the frame before it (it then reaches Python, which filters it with
# wants_unnamed_data).
_QUIET_FRAME = re.compile(
    rb"^event:[ ]*+(?!(?:response\.completed|response\.failed|response\.incomplete|error)"
    rb"[ \t]*\r?\n)[^\r\n]*\r?\n(?:data:[^\r\n]*\r?\n)*+\r?\n"
    rb"|^(?:(?<=\n\n)|(?<=\n\r\n))data:(?![^\r\n]*?" + _CARRIES + rb")[^\r\n]*+\r?\n\r?\n",
    re.MULTILINE,
)


def take_usage(usage: Usage, counts: Any) -> None:
    """OpenAI's usage under the Anthropic names: chat completions and embeddings say
    ``prompt_tokens``/``completion_tokens``, Responses ``input_tokens``/``output_tokens``.
    """
    if not isinstance(counts, dict):
        return
    if isinstance(counts.get("prompt_tokens"), int):
        # Embeddings have no completion_tokens: they write nothing.
        prompt, output = counts["prompt_tokens"], counts.get("completion_tokens", 0)
        details = counts.get("prompt_tokens_details")
    elif isinstance(counts.get("input_tokens"), int):
        prompt, output = counts["input_tokens"], counts.get("output_tokens")
        details = counts.get("input_tokens_details")
    else:
        return
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    # OpenAI's prompt count includes its cache hits; Anthropic's input_tokens excludes
    # them (cache_read_input_tokens is apart), and policy and audit add the fields up. So
    # the hits move to cache_read_input_tokens and input_tokens keeps the rest: the sum
    # stays what OpenAI bills as prompt + completion, and the audit's cache column means
    # the same for both providers. Hits above the prompt are not believed.
    if isinstance(cached, int):
        cached = min(max(cached, 0), max(prompt, 0))
        usage.tokens["input_tokens"] = prompt - cached
        usage.tokens["cache_read_input_tokens"] = cached
    else:
        usage.tokens["input_tokens"] = prompt
    if isinstance(output, int):
        usage.tokens["output_tokens"] = output


@dataclass(frozen=True)
class OpenAIWire(Wire):
    def error_body(self, status: int, error_type: str, message: str) -> bytes:
        error = {"message": message, "type": error_type, "param": None, "code": _CODES.get(status)}
        return json.dumps({"error": error}).encode()

    def stream_error_frame(self, error_body: bytes) -> bytes:
        return b"data: " + error_body + b"\n\n"

    def read_answer(self, usage: Usage, body: Any) -> None:
        """A chat completion, a response, an embeddings answer, a chunk or an error."""
        if not isinstance(body, dict):
            return
        if isinstance(body.get("model"), str):
            usage.model = body["model"][:100]
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            if isinstance(choices[0].get("finish_reason"), str):
                usage.stop_reason = choices[0]["finish_reason"]
        elif isinstance(body.get("status"), str) and body.get("object") == "response":
            # "incomplete" says less than why (max_output_tokens, content_filter).
            details = body.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            usage.stop_reason = reason if isinstance(reason, str) else body["status"]
        take_usage(usage, body.get("usage"))
        self.read_error(usage, body)

    def read_event(self, usage: Usage, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in _FINAL_EVENTS:
            self.read_answer(usage, event.get("response"))
        elif kind == "error" and not isinstance(event.get("error"), dict):
            # A Responses stream's error event: its fields are at the top level, and its
            # type is the event's.
            usage.error_type = str(event.get("code") or "error")[:100]
        else:  # a chat completions chunk, or the error frame that ends a chat stream
            self.read_answer(usage, event)

    def read_error(self, usage: Usage, payload: dict[str, Any]) -> None:
        error = payload.get("error")
        if isinstance(error, dict):  # a type, a code or both (a failed response: a code)
            usage.error_type = str(error.get("type") or error.get("code") or "error")[:100]

    def wants_unnamed_data(self, line: bytes) -> bool:
        # A chat chunk that the quiet-frame regex did not see whole (split across chunks).
        return _WANTED_DATA.search(line) is not None

    def read_long_data(self, usage: Usage, head: bytes, tail: bytes, *, event: bytes) -> bool:
        """A huge chat chunk or a Responses final event: its model leads, its usage ends it."""
        found = list(USAGE_OBJECT.finditer(tail))
        try:
            counts = json.loads(found[-1].group(1)) if found else None
        except (ValueError, UnicodeDecodeError):
            counts = None
        if counts is None:
            return False
        take_usage(usage, counts)
        model = MODEL_FIELD.search(head)
        if model:
            usage.model = model.group(1).decode("utf-8", "replace")
        status = STATUS_FIELD.search(head) if event else None
        if status:
            usage.stop_reason = status.group(1).decode()
        return True

    def unmetered_stream(self, usage: Usage, *, named_events: bool) -> str:
        if named_events:
            return "the stream carried no usage (no response.completed event)"
        return "the stream carried no usage (stream_options.include_usage not set)"


OPENAI = OpenAIWire(
    dialect="openai",
    metered_paths=("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions"),
    # Chat completions: max_completion_tokens (max_tokens is its deprecated name);
    # Responses: max_output_tokens.
    max_tokens_fields=("max_completion_tokens", "max_tokens", "max_output_tokens"),
    usage_events=frozenset(
        {b"response.completed", b"response.failed", b"response.incomplete", b"error"}
    ),
    quiet_frame=_QUIET_FRAME,
    uncapped_by_default=("/v1/chat/completions", "/v1/responses", "/v1/completions"),
    long_data_has_usage=True,
)
