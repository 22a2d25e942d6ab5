"""A fake OpenAI API on a real socket, speaking the real wire format.

It records every request (method, path, query, headers, body) so tests can assert what
reached the upstream, and accepts only the Bearer keys it is told are valid. It answers
/v1/models, /v1/chat/completions (JSON, or data-only SSE ending in ``[DONE]``, with a usage
chunk only when ``stream_options.include_usage`` asks for it), /v1/responses (JSON, or typed
SSE events ending in ``response.completed``), /v1/embeddings (floats or base64 float32) and
multipart /v1/files uploads; it can answer the next request with a scripted error.

The token counts are module constants, so a test can compare what was metered with what the
upstream said.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import json
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import served
from tests.fake_anthropic import Receive, Scope, SeenRequest, Send, received

PROMPT_TOKENS = 12
COMPLETION_TOKENS = 7
CACHED_TOKENS = 3
REASONING_TOKENS = 2
CHAT_USAGE: dict[str, Any] = {
    "prompt_tokens": PROMPT_TOKENS,
    "completion_tokens": COMPLETION_TOKENS,
    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": REASONING_TOKENS,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
RESPONSE_USAGE: dict[str, Any] = {
    "input_tokens": PROMPT_TOKENS,
    "output_tokens": COMPLETION_TOKENS,
    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    "input_tokens_details": {"cached_tokens": CACHED_TOKENS},
    "output_tokens_details": {"reasoning_tokens": REASONING_TOKENS},
}
REPLY_TEXT = "Hello from the fake OpenAI."
# The deltas a stream sends, in order; joined they are REPLY_TEXT.
REPLY_DELTAS = ["Hello", " from", " the", " fake", " OpenAI."]
EMBEDDING_DIMENSIONS = 8
CREATED = 1700000000
MODELS = [
    {"id": "gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "openai"},
    {"id": "gpt-4o", "object": "model", "created": CREATED, "owned_by": "openai"},
    {"id": "text-embedding-3-small", "object": "model", "created": CREATED, "owned_by": "openai"},
]


@dataclass
class SeenUpload:
    filename: str
    purpose: str
    size: int


@dataclass
class FakeOpenAI:
    valid_keys: set[str] = field(default_factory=set)
    requests: list[SeenRequest] = field(default_factory=list)
    uploads: list[SeenUpload] = field(default_factory=list)
    url: str = ""
    stream_gap_seconds: float = 0.0
    scripted: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    streams_abandoned: int = 0

    def reset(self) -> None:
        self.valid_keys.clear()
        self.requests.clear()
        self.uploads.clear()
        self.stream_gap_seconds = 0.0
        self.scripted.clear()
        self.streams_abandoned = 0

    def answer_next(self, status: int, payload: Any, **headers: str) -> None:
        """The next request gets this answer, whatever it asked (``retry_after="1"`` → header)."""
        self.scripted.append(
            (status, {k.replace("_", "-"): v for k, v in headers.items()}, payload)
        )

    def seen_keys(self) -> list[str]:
        """The Bearer key of each request, in order ("" when it sent none)."""
        return [bearer(seen.headers) or "" for seen in self.requests]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen = await received(scope, receive)  # ASGI header names are lowercase already
        self.requests.append(seen)
        method, path, headers, body = seen.method, seen.path, seen.headers, seen.body
        if self.scripted:
            status, extra, payload = self.scripted.pop(0)
            await send_json(send, status, payload, extra)
            return
        refusal = self._refusal(headers)
        if refusal is not None:
            await send_json(send, 401, refusal)
            return
        if (method, path) == ("GET", "/v1/models"):
            await send_json(send, 200, {"object": "list", "data": MODELS})
        elif (method, path) == ("POST", "/v1/files"):
            status, payload = self._upload(headers.get("content-type", ""), body)
            await send_json(send, status, payload)
        elif method == "POST" and path in JSON_ENDPOINTS:
            try:
                request = json.loads(body)
            except ValueError:
                await send_json(send, 400, openai_error("We could not parse the JSON body."))
                return
            if request.get("stream") and path in STREAMS:
                frames = STREAMS[path](request)
                await self._stream(receive, send, frames)
                return
            await send_json(send, 200, JSON_ENDPOINTS[path](request))
        else:
            await send_json(
                send, 404, openai_error(f"Invalid URL ({method} {path})", param=None, code=None)
            )

    def _refusal(self, headers: dict[str, str]) -> dict[str, Any] | None:
        key = bearer(headers)
        if key is None:
            return openai_error(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if key not in self.valid_keys:
            return openai_error(
                f"Incorrect API key provided: {masked(key)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return None

    def _upload(self, content_type: str, body: bytes) -> tuple[int, Any]:
        fields = multipart_fields(content_type, body)
        if "file" not in fields or "purpose" not in fields:
            return 400, openai_error("Missing required parameter: 'file' or 'purpose'.")
        filename, content = fields["file"]
        purpose = fields["purpose"][1].decode()
        self.uploads.append(SeenUpload(filename, purpose, len(content)))
        return 200, {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }

    async def _stream(self, receive: Receive, send: Send, frames: list[bytes]) -> None:
        """SSE frames; a client that hangs up mid-stream is counted in streams_abandoned."""
        streaming = asyncio.ensure_future(self._send_frames(send, frames))
        hangup = asyncio.ensure_future(receive())
        await asyncio.wait({streaming, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if not streaming.done():
            streaming.cancel()
            self.streams_abandoned += 1
            return
        hangup.cancel()
        streaming.result()

    async def _send_frames(self, send: Send, frames: list[bytes]) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", request_id().encode()),
                ],
            }
        )
        for number, frame in enumerate(frames):
            if number and self.stream_gap_seconds:
                await asyncio.sleep(self.stream_gap_seconds)
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def bearer(headers: dict[str, str]) -> str | None:
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def masked(key: str) -> str:
    """As OpenAI shows a wrong key: its first and last few characters, never all of it."""
    if len(key) < 12:
        return "*" * len(key)
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


def openai_error(
    message: str,
    error_type: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body, e.g. ``openai_error("Rate limit reached", "requests",
    code="rate_limit_exceeded")`` for a 429."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


async def send_json(
    send: Send, status: int, payload: Any, extra: dict[str, str] | None = None
) -> None:
    # Bytes are sent as they are: a test's hostile body.
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"x-request-id", request_id().encode()),
        *[(k.encode(), v.encode()) for k, v in (extra or {}).items()],
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def multipart_fields(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """name → (filename, content) of a multipart/form-data body, parsed by the stdlib."""
    if not content_type.startswith("multipart/form-data"):
        return {}
    document = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields = {}
    for part in document.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            content = part.get_payload(decode=True)
            fields[name] = (
                part.get_filename() or "",
                content if isinstance(content, bytes) else b"",
            )
    return fields


def chat_completion(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "gpt-4o-mini"),
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": REPLY_TEXT,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": CHAT_USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def chat_frames(request: dict[str, Any]) -> list[bytes]:
    """A streamed chat completion as OpenAI sends it: data-only frames, then ``[DONE]``."""
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.get("model", "gpt-4o-mini"),
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    # With include_usage every chunk carries "usage": null, and the last one the usage.
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**base, "choices": [choice]}

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
    chunks += [chunk({"content": text}) for text in REPLY_DELTAS]
    chunks.append(chunk({}, "stop"))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": CHAT_USAGE})
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def response_body(
    request: dict[str, Any], *, response_id: str, message_id: str, completed: bool = True
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": response_id,
        "object": "response",
        "created_at": now,
        "status": "completed" if completed else "in_progress",
        "completed_at": now if completed else None,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model", "gpt-4o-mini"),
        "output": [output_message(message_id, REPLY_TEXT)] if completed else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": RESPONSE_USAGE if completed else None,
        "user": None,
        "metadata": {},
    }


def output_message(message_id: str, text: str | None) -> dict[str, Any]:
    """The assistant's message item; ``text=None`` is the item as first announced, empty."""
    return {
        "id": message_id,
        "type": "message",
        "status": "in_progress" if text is None else "completed",
        "role": "assistant",
        "content": [] if text is None else [output_text(text)],
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response(request: dict[str, Any]) -> dict[str, Any]:
    return response_body(
        request, response_id=f"resp_{uuid.uuid4().hex}", message_id=f"msg_{uuid.uuid4().hex}"
    )


def response_frames(request: dict[str, Any]) -> list[bytes]:
    """A streamed response as OpenAI sends it: typed events, numbered, ending completed."""
    response_id, message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    started = response_body(
        request, response_id=response_id, message_id=message_id, completed=False
    )
    in_part = {"item_id": message_id, "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": output_message(message_id, None),
        },
        {"type": "response.content_part.added", **in_part, "part": output_text("")},
    ]
    events += [
        {"type": "response.output_text.delta", **in_part, "delta": text, "logprobs": []}
        for text in REPLY_DELTAS
    ]
    events += [
        {"type": "response.output_text.done", **in_part, "text": REPLY_TEXT, "logprobs": []},
        {"type": "response.content_part.done", **in_part, "part": output_text(REPLY_TEXT)},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": output_message(message_id, REPLY_TEXT),
        },
        {
            "type": "response.completed",
            "response": response_body(request, response_id=response_id, message_id=message_id),
        },
    ]
    return [
        f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': n})}\n\n".encode()
        for n, event in enumerate(events)
    ]


def embedding_vector(index: int, dimensions: int) -> list[float]:
    """Eighths, exact in float32, so a base64 answer decodes to these very numbers."""
    return [(index * dimensions + d) / 8 for d in range(dimensions)]


def embeddings(request: dict[str, Any]) -> dict[str, Any]:
    given = request.get("input", "")
    # A string, a list of strings, a token list, or a list of token lists.
    inputs = [given] if isinstance(given, str) or not given or isinstance(given[0], int) else given
    dimensions = int(request.get("dimensions") or EMBEDDING_DIMENSIONS)
    tokens = sum(len(item.split()) if isinstance(item, str) else len(item) for item in inputs)

    def encoded(vector: list[float]) -> list[float] | str:
        if request.get("encoding_format") == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": encoded(embedding_vector(i, dimensions)),
            }
            for i in range(len(inputs))
        ],
        "model": request.get("model", "text-embedding-3-small"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


JSON_ENDPOINTS = {
    "/v1/chat/completions": chat_completion,
    "/v1/responses": response,
    "/v1/embeddings": embeddings,
}
STREAMS = {"/v1/chat/completions": chat_frames, "/v1/responses": response_frames}


@pytest.fixture(scope="session")
def _fake_openai_server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    with served(fake) as fake.url:
        yield fake


@pytest.fixture
def fake_openai(_fake_openai_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """The fake OpenAI upstream, fresh for each test: no valid keys, no requests seen."""
    _fake_openai_server.reset()
    yield _fake_openai_server
    _fake_openai_server.reset()
