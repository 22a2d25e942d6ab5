"""Usage read from responses as they stream: frames split anywhere, either line ending."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from proxy.metering import UsageMeter
from tests.fake_anthropic import message_body, sse_frames

REQUEST = {"model": "claude-haiku-4-5", "stream": True}


def stream_bytes(newline: bytes = b"\n") -> bytes:
    body = b"".join(sse_frames(REQUEST, 7))
    return body.replace(b"\n", newline)


def meter_in_pieces(body: bytes, cuts: list[int], **kwargs: str) -> UsageMeter:
    meter = UsageMeter(content_type=kwargs.get("content_type", "text/event-stream"),
                       content_encoding=kwargs.get("content_encoding", ""))  # fmt: skip
    previous = 0
    for cut in [*sorted(cuts), len(body)]:
        meter.feed(body[previous:cut])
        previous = cut
    return meter


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
@pytest.mark.parametrize("seed", range(25))
def test_frames_split_anywhere_give_the_same_usage(newline: bytes, seed: int) -> None:
    body = stream_bytes(newline)
    cuts = random.Random(seed).sample(range(1, len(body)), k=min(40, len(body) - 1))
    usage = meter_in_pieces(body, cuts).finish()
    assert usage.model == "claude-haiku-4-5"
    assert usage.stop_reason == "end_turn"
    # message_start said output 1; the last cumulative message_delta says 14.
    assert usage.tokens == {
        "input_tokens": 12,
        "output_tokens": 14,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3,
    }


def test_one_byte_at_a_time() -> None:
    body = stream_bytes(b"\r\n")
    usage = meter_in_pieces(body, list(range(1, len(body)))).finish()
    assert usage.tokens["output_tokens"] == 14


def test_a_later_delta_overrides_an_earlier_one() -> None:
    frames = [
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"m",'
        b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":null},'
        b'"usage":{"output_tokens":3}}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
        b'"usage":{"output_tokens":9,"input_tokens":6}}\n\n',
    ]
    usage = meter_in_pieces(b"".join(frames), []).finish()
    assert usage.tokens == {"input_tokens": 6, "output_tokens": 9}
    assert usage.stop_reason == "max_tokens"


def test_a_streamed_error_event_is_noted() -> None:
    body = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'
    assert meter_in_pieces(body, [10]).finish().error_type == "overloaded_error"


def test_json_and_gzipped_json() -> None:
    body = json.dumps(message_body({"model": "claude-x"})).encode()
    plain = meter_in_pieces(body, [7, 30], content_type="application/json").finish()
    zipped = gzip.compress(body)
    packed = meter_in_pieces(
        zipped, [3, 20], content_type="application/json", content_encoding="gzip"
    ).finish()
    for usage in (plain, packed):
        assert (usage.model, usage.stop_reason) == ("claude-x", "end_turn")
        assert usage.tokens["input_tokens"] == 12


def test_garbage_never_raises() -> None:
    for content_type in ("text/event-stream", "application/json"):
        meter = UsageMeter(content_type=content_type, content_encoding="gzip")
        meter.feed(b"\x00\xff not gzip at all")
        meter.feed(b"data: {broken\n\n")
        assert meter.finish().tokens == {}
    unknown = UsageMeter(content_type="application/json", content_encoding="br")
    unknown.feed(b'{"usage": {"input_tokens": 1}}')
    assert unknown.finish().tokens == {}
