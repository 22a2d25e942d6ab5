"""Usage read from responses as they stream: frames split anywhere, either line ending."""

from __future__ import annotations

import gzip
import json
import random
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.metering import UsageMeter, meterable_accept_encoding
from tests.fake_anthropic import FakeAnthropic, message_body, sse_frames

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


def test_an_event_name_with_trailing_blanks_still_counts() -> None:
    body = stream_bytes().replace(b"event: message_delta\n", b"event: message_delta \t\n")
    assert meter_in_pieces(body, []).finish().tokens["output_tokens"] == 14


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
    assert unknown.usage.unmetered == "content-encoding br not readable"


# Security issue #19, item 3: an answer the meter cannot decompress must not go unseen.


@pytest.mark.parametrize(
    ("client", "upstream"),
    [
        (None, b"identity"),
        (b"", b"identity"),
        (b"br", b"identity"),
        (b"*", b"identity"),
        (b"gzip, deflate, br, zstd", b"gzip, deflate"),
        (b"br;q=1.0, gzip;q=0.8, *;q=0.1", b"gzip;q=0.8"),
        (b"zstd,GZIP ; q=0.5,identity", b"GZIP ; q=0.5, identity"),
        (b"br, identity;q=0", b"identity"),
        (b"gzip;q=0, deflate;q=0.3", b"gzip;q=0, deflate;q=0.3"),
        (b"gzip;q=high, x-gzip", b"x-gzip"),
    ],
)
def test_accept_encoding_keeps_only_what_the_meter_reads(
    client: bytes | None, upstream: bytes
) -> None:
    assert meterable_accept_encoding(client) == upstream


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, br", "compress"])
def test_an_answer_in_a_coding_it_cannot_read_is_reported_unmetered(
    content_type: str, encoding: str
) -> None:
    meter = UsageMeter(content_type=content_type, content_encoding=encoding)
    meter.feed(b"\x8b\x03\x80 whatever brotli makes")
    usage = meter.finish()
    assert usage.tokens == {}
    assert usage.unmetered == f"content-encoding {encoding} not readable"


def test_a_corrupt_gzip_answer_is_reported_unmetered() -> None:
    meter = UsageMeter(content_type="application/json", content_encoding="gzip")
    meter.feed(b"\x1f\x8b\x08\x00 then nonsense" * 10)
    assert meter.finish().unmetered == "content-encoding gzip corrupt"


def test_bodies_without_usage_are_not_called_unmetered() -> None:
    download = UsageMeter(content_type="application/octet-stream", content_encoding="br")
    download.feed(b"\x00" * 100)
    assert download.finish().unmetered == ""
    identity = meter_in_pieces(stream_bytes(), [5], content_encoding="identity").finish()
    assert (identity.unmetered, identity.tokens["output_tokens"]) == ("", 14)


def test_gzip_members_one_after_another_are_all_read() -> None:
    body = stream_bytes()
    half = len(body) // 2
    zipped = gzip.compress(body[:half]) + gzip.compress(body[half:])
    usage = meter_in_pieces(zipped, [11, half], content_encoding="gzip").finish()
    assert (usage.unmetered, usage.tokens["output_tokens"]) == ("", 14)


# Security issue #19, item 8: a hostile upstream must not exhaust memory or time.


def gzip_bomb(size: int = 1 << 30) -> bytes:
    """``size`` zero bytes gzipped (about 1 MB for 1 GB), built without compressing 1 GB."""
    block = 1 << 20
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # A full flush ends on a byte boundary with no back-references: repeats are valid.
    piece = packer.compress(bytes(block)) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    zeros = bytes(block)
    for _ in range(size // block):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = b"\x03\x00" + struct.pack("<II", crc, size & 0xFFFFFFFF)
    return header + piece * (size // block) + trailer


def peak_memory_feeding(meter: UsageMeter, chunks: Iterator[bytes]) -> int:
    tracemalloc.start()
    try:
        for chunk in chunks:
            meter.feed(chunk)
        meter.finish()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def in_chunks(body: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_the_bomb_is_a_real_one() -> None:
    bomb = gzip_bomb(64 << 20)
    assert len(gzip.decompress(bomb)) == 64 << 20


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_a_gzip_bomb_is_cut_off_with_memory_bounded(content_type: str) -> None:
    bomb = gzip_bomb()
    meter = UsageMeter(content_type=content_type, content_encoding="gzip")
    peak = peak_memory_feeding(meter, in_chunks(bomb, 128 * 1024))
    assert peak < 64 * 2**20
    assert meter.usage.unmetered  # json over 4 MB, or a line over 1 MB


def test_a_bomb_of_blank_lines_stops_at_the_decompressed_bound() -> None:
    bomb = gzip.compress(b"\n" * (32 << 20))
    meter = UsageMeter(content_type="text/event-stream", content_encoding="gzip")
    peak = peak_memory_feeding(meter, in_chunks(bomb, 64 * 1024))
    assert peak < 64 * 2**20
    assert meter.usage.unmetered == "over 16 MB decompressed"


def endless_line(total: int, chunk: int) -> Iterator[bytes]:
    piece = b"data: " + b"x" * (chunk - 6)
    yield piece
    piece = b"x" * chunk
    for _ in range(total // chunk - 1):
        yield piece


def test_a_128_mb_line_without_newline_keeps_memory_bounded() -> None:
    meter = UsageMeter(content_type="text/event-stream")
    peak = peak_memory_feeding(meter, endless_line(128 << 20, 64 * 1024))
    assert peak < 8 * 2**20
    assert meter.usage.unmetered == "a line over 1 MB"


def test_a_long_line_of_an_event_without_usage_is_skipped() -> None:
    frames = stream_bytes().split(b"\n\n")
    huge = b'event: content_block_delta\ndata: {"text": "' + b"y" * (3 << 20) + b'"}'
    body = b"\n\n".join([frames[0], huge, *frames[1:]])
    usage = meter_in_pieces(body, list(range(1, len(body), 64 * 1024))).finish()
    assert (usage.unmetered, usage.tokens["output_tokens"]) == ("", 14)


def test_many_data_lines_in_one_event_are_bounded() -> None:
    body = b"event: message_delta\n" + (b"data: " + b"x" * 1000 + b"\n") * (32 << 10)
    meter = UsageMeter(content_type="text/event-stream")
    peak = peak_memory_feeding(meter, in_chunks(body, 64 * 1024))
    assert peak < 16 * 2**20
    assert meter.usage.unmetered == "an event over 1 MB"


def test_a_meter_bug_never_reaches_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    meter = UsageMeter(content_type="text/event-stream")

    def broken(line: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(meter, "_line", broken)
    meter.feed(b"event: ping\n\n")
    meter.feed(b"more\n")
    assert meter.finish().unmetered == "meter failed (RuntimeError)"


# Batch results: JSON Lines, one result per request; succeeded ones carry usage.


def result_line(custom_id: str, kind: str = "succeeded", model: str = "claude-x") -> bytes:
    result: dict[str, object] = {"type": kind}
    if kind == "succeeded":
        result["message"] = message_body({"model": model})
    elif kind == "errored":
        result["error"] = {"type": "error", "error": {"type": "invalid_request_error"}}
    return json.dumps({"custom_id": custom_id, "result": result}).encode()


def results_meter(body: bytes, cuts: list[int]) -> UsageMeter:
    meter = UsageMeter(content_type="application/binary", jsonl=True)
    previous = 0
    for cut in [*sorted(cuts), len(body)]:
        meter.feed(body[previous:cut])
        previous = cut
    return meter


@pytest.mark.parametrize("seed", range(10))
def test_batch_results_add_up_the_succeeded_requests(seed: int) -> None:
    lines = [result_line(f"r{n}") for n in range(5)]
    lines += [result_line("bad", "errored"), result_line("late", "expired")]
    lines.insert(2, result_line("c", "canceled"))
    body = b"\n".join(lines) + b"\n"
    cuts = random.Random(seed).sample(range(1, len(body)), k=30)
    usage = results_meter(body, cuts).finish()
    assert usage.requests == 8
    assert usage.tokens == {
        "input_tokens": 60,
        "output_tokens": 30,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 15,
    }
    assert (usage.model, usage.unmetered) == ("claude-x", "")


def test_batch_results_name_every_model_and_take_crlf_and_no_final_newline() -> None:
    body = result_line("a", model="claude-b") + b"\r\n\r\n" + result_line("b", model="claude-a")
    usage = results_meter(body, [40]).finish()
    assert (usage.requests, usage.tokens["output_tokens"]) == (2, 12)
    assert usage.model == "claude-a,claude-b"


async def test_the_fake_upstreams_results_are_metered() -> None:
    fake = FakeAnthropic(results_errored={"r1"})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await fake._results(send, {"_custom_ids": ["r0", "r1", "r2"]})
    content_type = dict(sent[0]["headers"])[b"content-type"].decode()
    meter = UsageMeter(content_type=content_type, jsonl=True)
    for message in sent[1:]:
        meter.feed(message["body"])
    usage = meter.finish()
    assert (usage.requests, usage.tokens["input_tokens"], usage.model) == (3, 24, "claude")


def test_a_result_line_too_long_to_hold_is_read_from_its_ends() -> None:
    message = message_body({"model": "claude-long"})
    message["content"] = [{"type": "text", "text": "z" * (3 << 20)}]
    message["usage"]["cache_creation"] = {"ephemeral_5m_input_tokens": 0}
    message["usage"]["output_tokens"] = 64000
    line = json.dumps({"custom_id": "big", "result": {"type": "succeeded", "message": message}})
    body = result_line("small") + b"\n" + line.encode() + b"\n" + result_line("x", "errored")
    meter = results_meter(body, list(range(1, len(body), 64 * 1024)))
    peak = peak_memory_feeding(meter, iter([]))
    usage = meter.usage
    assert (usage.requests, usage.unmetered) == (3, "")
    assert usage.tokens["output_tokens"] == 64006
    assert usage.model == "claude-long,claude-x"
    assert peak < 8 * 2**20


def test_results_that_are_not_results_are_reported() -> None:
    assert results_meter(b"not json\n", []).finish().unmetered == (
        "a batch results line is not JSON"
    )
    error = json.dumps({"type": "error", "error": {"type": "not_found_error"}}).encode()
    usage = results_meter(error, []).finish()
    assert (usage.error_type, usage.unmetered, usage.requests) == ("not_found_error", "", 0)
    no_usage = b'{"custom_id": "a", "result": {"type": "succeeded", "message": {}}}\n'
    assert results_meter(no_usage, []).finish().unmetered == (
        "a succeeded batch result without usage"
    )


def test_finishing_twice_does_not_count_twice() -> None:
    meter = results_meter(result_line("a"), [])
    meter.finish()
    assert meter.finish().tokens["input_tokens"] == 12


def test_a_flood_of_results_stops_at_the_line_budget() -> None:
    line = b'{"custom_id":"a","result":{"type":"expired"}}\n'
    meter = UsageMeter(content_type="application/x-jsonl", jsonl=True)
    for chunk in in_chunks(line * 110_000, 64 * 1024):
        meter.feed(chunk)
    assert meter.finish().unmetered == "over 100000 lines"
