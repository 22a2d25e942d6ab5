"""OpenAI's usage read as its answers stream by (issue 16): JSON answers, chat completions
streams with and without their usage chunk, Responses streams, errors, and bodies that try
to make the meter hold too much."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.metering import UsageMeter
from tests.fake_anthropic import sse_frames
from tests.test_metering import in_chunks, peak_memory_feeding

CHAT_MODEL = "gpt-4o-mini-2024-07-18"
RESPONSES_MODEL = "gpt-4.1-2025-04-14"
# 20 prompt tokens of which 4 came from the cache, 5 written: OpenAI bills 20 + 5.
CHAT_TOKENS = {"input_tokens": 16, "cache_read_input_tokens": 4, "output_tokens": 5}
CHAT_USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 5,
    "total_tokens": 25,
    "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
RESPONSES_USAGE = {
    "input_tokens": 30,
    "input_tokens_details": {"cached_tokens": 10},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 2},
    "total_tokens": 37,
}
RESPONSES_TOKENS = {"input_tokens": 20, "cache_read_input_tokens": 10, "output_tokens": 7}


def meter(
    body: bytes, cuts: list[int] | None = None, *, content_type: str = "text/event-stream",
    content_encoding: str = "",
) -> UsageMeter:  # fmt: skip
    usage_meter = UsageMeter(
        content_type=content_type, content_encoding=content_encoding, dialect="openai"
    )
    previous = 0
    for cut in [*sorted(cuts or []), len(body)]:
        usage_meter.feed(body[previous:cut])
        previous = cut
    return usage_meter


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": CHAT_MODEL,
        "system_fingerprint": "fp_06737a9306",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def chat_stream(*, include_usage: bool = True, words: int = 5, newline: bytes = b"\n") -> bytes:
    """A chat completions stream as OpenAI sends it: data-only frames, then [DONE]."""
    # With include_usage every chunk says "usage": null; the last one, with no choices, has it.
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    chunks = [chunk({"role": "assistant", "content": "", "refusal": None}, **extra)]
    chunks += [chunk({"content": f"word{n} "}, **extra) for n in range(words)]
    chunks.append(chunk({}, "stop", **extra))
    if include_usage:
        chunks.append({**chunk({}), "choices": [], "usage": CHAT_USAGE})
    frames = [b"data: " + json.dumps(data).encode() + b"\n\n" for data in chunks]
    return b"".join([*frames, b"data: [DONE]\n\n"]).replace(b"\n", newline)


def response_object(status: str, usage: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "resp_67ccd2bed1ec8190b14f964abc054267",
        "object": "response",
        "created_at": 1741476542,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": "Answer briefly.",
        "model": RESPONSES_MODEL,
        "output": [],
        "parallel_tool_calls": True,
        "usage": usage,
        "user": None,
        "metadata": {},
        **extra,
    }


def responses_stream(words: int = 5, final: dict[str, Any] | None = None) -> bytes:
    """A Responses API stream: typed events; only the final one carries usage."""
    text = "".join(f"word{n} " for n in range(words))
    message = {
        "id": "msg_1",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response_object("in_progress", None)},
        {"type": "response.in_progress", "response": response_object("in_progress", None)},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**message, "content": []}},
    ]  # fmt: skip
    events += [
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": f"word{n} "}
        for n in range(words)
    ]  # fmt: skip
    events.append({"type": "response.output_text.done", "item_id": "msg_1", "text": text})
    events.append({"type": "response.output_item.done", "output_index": 0, "item": message})
    events.append(
        final
        or {
            "type": "response.completed",
            "response": response_object("completed", RESPONSES_USAGE, output=[message]),
        }
    )
    return b"".join(
        b"event: %s\ndata: %s\n\n"
        % (event["type"].encode(), json.dumps({**event, "sequence_number": n}).encode())
        for n, event in enumerate(events)
    )


# --- JSON answers ---------------------------------------------------------------------------


def test_a_chat_completion_counts_cache_hits_apart_from_the_rest_of_the_prompt() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": CHAT_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                     "finish_reason": "length"}],
        "usage": CHAT_USAGE,
    }  # fmt: skip
    usage = meter(json.dumps(body).encode(), [9, 80], content_type="application/json").finish()
    assert (usage.model, usage.stop_reason, usage.unmetered) == (CHAT_MODEL, "length", "")
    assert usage.tokens == CHAT_TOKENS
    assert sum(usage.tokens.values()) == 25  # what OpenAI bills: prompt + completion


def test_a_response_takes_its_status_as_the_stop_reason() -> None:
    body = json.dumps(response_object("completed", RESPONSES_USAGE)).encode()
    usage = meter(body, content_type="application/json; charset=utf-8").finish()
    assert (usage.model, usage.stop_reason, usage.tokens) == (
        RESPONSES_MODEL,
        "completed",
        RESPONSES_TOKENS,
    )


def test_an_incomplete_response_says_why() -> None:
    incomplete = response_object(
        "incomplete", RESPONSES_USAGE, incomplete_details={"reason": "max_output_tokens"}
    )
    usage = meter(json.dumps(incomplete).encode(), content_type="application/json").finish()
    assert (usage.stop_reason, usage.tokens["output_tokens"]) == ("max_output_tokens", 7)


def test_embeddings_count_their_prompt_and_write_nothing() -> None:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    usage = meter(json.dumps(body).encode(), content_type="application/json").finish()
    assert (usage.model, usage.tokens, usage.unmetered) == (
        "text-embedding-3-small",
        {"input_tokens": 8, "output_tokens": 0},
        "",
    )


def test_a_gzipped_chat_completion_is_read() -> None:
    body = json.dumps({"model": CHAT_MODEL, "choices": [], "usage": CHAT_USAGE}).encode()
    zipped = gzip.compress(body)
    usage = meter(
        zipped, [4, 17], content_type="application/json", content_encoding="gzip"
    ).finish()
    assert (usage.tokens, usage.unmetered) == (CHAT_TOKENS, "")


@pytest.mark.parametrize(
    ("error", "error_type"),
    [
        ({"message": "Incorrect API key provided", "type": "invalid_request_error",
          "param": None, "code": "invalid_api_key"}, "invalid_request_error"),
        ({"message": "Rate limit reached", "type": None, "code": "rate_limit_exceeded"},
         "rate_limit_exceeded"),
    ],
)  # fmt: skip
def test_an_error_body_names_its_type_or_else_its_code(
    error: dict[str, Any], error_type: str
) -> None:
    body = json.dumps({"error": error}).encode()
    usage = meter(body, content_type="application/json").finish()
    assert (usage.error_type, usage.tokens, usage.unmetered) == (error_type, {}, "")


def test_cache_hits_above_the_prompt_are_not_believed() -> None:
    lying = {"model": "m", "usage": {"prompt_tokens": 10, "completion_tokens": 1,
                                     "prompt_tokens_details": {"cached_tokens": 99}}}  # fmt: skip
    usage = meter(json.dumps(lying).encode(), content_type="application/json").finish()
    assert usage.tokens == {"input_tokens": 0, "cache_read_input_tokens": 10, "output_tokens": 1}


# --- chat completions streams ---------------------------------------------------------------


def test_every_split_of_a_chat_stream_gives_the_same_usage() -> None:
    body = chat_stream(words=2)
    for cut in range(1, len(body)):
        usage = meter(body, [cut]).finish()
        assert (usage.model, usage.stop_reason, usage.tokens, usage.unmetered) == (
            CHAT_MODEL,
            "stop",
            CHAT_TOKENS,
            "",
        ), cut


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_a_chat_stream_one_byte_at_a_time(newline: bytes) -> None:
    body = chat_stream(newline=newline)
    usage = meter(body, list(range(1, len(body)))).finish()
    assert (usage.stop_reason, usage.tokens, usage.unmetered) == ("stop", CHAT_TOKENS, "")


def test_a_chat_stream_without_its_usage_chunk_is_unmetered_and_says_why() -> None:
    usage = meter(chat_stream(include_usage=False), [100]).finish()
    assert usage.tokens == {}
    assert usage.unmetered == "the stream carried no usage (stream_options.include_usage not set)"
    assert (usage.model, usage.stop_reason) == (CHAT_MODEL, "stop")


def test_a_gzipped_chat_stream_is_read() -> None:
    body = chat_stream()
    usage = meter(gzip.compress(body), [10, 200], content_encoding="gzip").finish()
    assert (usage.tokens, usage.unmetered) == (CHAT_TOKENS, "")


def test_chunks_without_usage_never_reach_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow client lets 300 chunks pile up into one read: the regex drops them, as it
    drops Anthropic's content deltas, and Python looks at a handful of lines."""
    usage_meter = UsageMeter(content_type="text/event-stream", dialect="openai")
    seen: list[bytes] = []
    line = usage_meter._line

    def counted(data: bytes) -> None:
        seen.append(data)
        line(data)

    monkeypatch.setattr(usage_meter, "_line", counted)
    usage_meter.feed(chat_stream(words=300))
    usage = usage_meter.finish()
    assert usage.tokens == CHAT_TOKENS
    data_lines = [data for data in seen if data.startswith(b"data:")]
    # The first two chunks (the first line is read before the regex looks, and the second's
    # frame start is not in what it looks at), the finish reason and the usage.
    assert len(data_lines) == 4, data_lines


def test_a_text_that_talks_about_usage_is_not_taken_for_it() -> None:
    sneaky = chunk({"content": 'say "usage": {"prompt_tokens": 999999}'}, usage=None)
    frame = b"data: " + json.dumps(sneaky).encode() + b"\n\n"
    usage = meter(frame * 3 + chat_stream()).finish()
    assert usage.tokens == CHAT_TOKENS


def test_the_error_frame_that_ends_a_chat_stream_is_noted() -> None:
    body = chat_stream(include_usage=False).replace(b"data: [DONE]\n\n", b"")
    error = {"error": {"message": "over quota", "type": "insufficient_quota", "code": None}}
    usage = meter(body + b"data: " + json.dumps(error).encode() + b"\n\n").finish()
    assert usage.error_type == "insufficient_quota"
    assert usage.unmetered == "the stream ended in an error without usage"


# --- Responses streams ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_a_responses_stream_split_anywhere_reads_its_completed_event(seed: int) -> None:
    body = responses_stream()
    cuts = random.Random(seed).sample(range(1, len(body)), k=40)
    usage = meter(body, cuts).finish()
    assert (usage.model, usage.stop_reason, usage.tokens, usage.unmetered) == (
        RESPONSES_MODEL,
        "completed",
        RESPONSES_TOKENS,
        "",
    )


def test_a_failed_response_counts_its_usage_and_names_its_error() -> None:
    failed = response_object(
        "failed", RESPONSES_USAGE, error={"code": "server_error", "message": "boom"}
    )
    body = responses_stream(final={"type": "response.failed", "response": failed})
    usage = meter(body, [333]).finish()
    assert (usage.stop_reason, usage.error_type, usage.tokens) == (
        "failed",
        "server_error",
        RESPONSES_TOKENS,
    )


def test_a_responses_error_event_is_noted_and_the_stream_unmetered() -> None:
    error = {"type": "error", "code": "ERR_SOMETHING", "message": "Something went wrong",
             "param": None}  # fmt: skip
    body = responses_stream(final=error)
    usage = meter(body).finish()
    assert (usage.error_type, usage.tokens) == ("ERR_SOMETHING", {})
    assert usage.unmetered == "the stream ended in an error without usage"


def test_a_responses_stream_cut_before_its_end_is_unmetered() -> None:
    body = responses_stream()
    cut = body[: body.index(b"event: response.completed")]
    usage = meter(cut, [50]).finish()
    assert usage.unmetered == "the stream carried no usage (no response.completed event)"


# --- hostile bodies: memory stays bounded ---------------------------------------------------


def endless_data_line(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    yield b'data: {"choices":[{"delta":{"content":"'
    piece = b"x" * size
    for _ in range(total // size):
        yield piece


def test_an_endless_chat_line_keeps_memory_bounded_and_is_unmetered() -> None:
    usage_meter = UsageMeter(content_type="text/event-stream", dialect="openai")
    peak = peak_memory_feeding(usage_meter, endless_data_line(8 << 20))
    assert peak < 4 * 2**20
    assert usage_meter.usage.unmetered == "the stream carried no usage (a line over 1 MB not read)"


def test_an_endless_line_that_is_not_data_stops_the_meter() -> None:
    usage_meter = UsageMeter(content_type="text/event-stream", dialect="openai")
    peak = peak_memory_feeding(usage_meter, in_chunks(b"x" * (4 << 20), 64 * 1024))
    assert peak < 4 * 2**20
    assert usage_meter.usage.unmetered == "a line over 1 MB"


def test_a_huge_chunk_before_the_usage_chunk_does_not_lose_the_usage() -> None:
    huge = chunk({"content": "y" * (3 << 20)}, usage=None)
    body = b"data: " + json.dumps(huge).encode() + b"\n\n" + chat_stream()
    usage_meter = meter(body, list(range(1, len(body), 64 * 1024)))
    assert (usage_meter.finish().tokens, usage_meter.usage.unmetered) == (CHAT_TOKENS, "")


def test_a_completed_event_too_long_to_hold_is_read_from_its_ends() -> None:
    message = {"type": "message", "content": [{"type": "output_text", "text": "z" * (3 << 20)}]}
    completed = response_object("completed", RESPONSES_USAGE, output=[message])
    body = responses_stream(final={"type": "response.completed", "response": completed})
    usage_meter = meter(body, list(range(1, len(body), 64 * 1024)))
    peak = peak_memory_feeding(usage_meter, iter([]))
    usage = usage_meter.usage
    assert (usage.model, usage.stop_reason, usage.tokens, usage.unmetered) == (
        RESPONSES_MODEL,
        "completed",
        RESPONSES_TOKENS,
        "",
    )
    assert peak < 4 * 2**20


@pytest.mark.parametrize(
    "frame",
    [
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n',
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n',
    ],
    ids=["chat-chunks", "responses-deltas"],
)
def test_a_gzip_bomb_of_frames_stops_at_the_decompressed_bound(frame: bytes) -> None:
    bomb = gzip.compress(frame * ((20 << 20) // len(frame)))
    usage_meter = UsageMeter(
        content_type="text/event-stream", content_encoding="gzip", dialect="openai"
    )
    peak = peak_memory_feeding(usage_meter, in_chunks(bomb, 64 * 1024))
    assert peak < 64 * 2**20
    assert usage_meter.usage.unmetered == "over 16 MB decompressed"


# --- Anthropic stays the default ------------------------------------------------------------


def test_without_a_dialect_the_meter_reads_anthropic() -> None:
    body = b"".join(sse_frames({"model": "claude-haiku-4-5", "stream": True}, 7))
    usage_meter = UsageMeter(content_type="text/event-stream")
    usage_meter.feed(body)
    usage = usage_meter.finish()
    assert (usage.model, usage.stop_reason, usage.unmetered) == ("claude-haiku-4-5", "end_turn", "")
    assert usage.tokens["output_tokens"] == 14
    # The same meter in OpenAI's dialect finds none of OpenAI's usage in it.
    assert meter(body).finish().tokens == {}
