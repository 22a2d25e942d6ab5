"""Properties of the pure functions that stand between a hostile client (or upstream) and the
backend's key, checked by hypothesis over many generated inputs (issue 14):

- the path joiner (proxy/paths.py, agent/keybroker/wire.py): whatever path and query a client
  sends, the URL either stays on the backend's own scheme, host and port, under its base
  path, with no dot segment and the query as sent, or is refused;
- the SSE meter (proxy/metering.py): a stream split into chunks anywhere meters as the
  whole stream does, and no bytes at all make it fail;
- the policy matchers (broker/services/policy.py, proxy/policy.py): path globs keep ``*``
  inside a segment, a model is allowed exactly when a pattern matches it, and no repeated
  key lets keybroker and the upstream read different models or caps.

Example counts are bounded (``EXAMPLES``) so the file takes a few seconds.
"""

from __future__ import annotations

import fnmatch
import gzip
import itertools
import json
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from broker.infra.errors import ServiceError
from broker.services.policy import Policy, glob_check, path_allowed
from keybroker.wire import PROXY_PREFIX, proxy_base_url
from proxy.metering import UsageMeter
from proxy.paths import PathRefused, proxy_path_parse, upstream_url
from proxy.policy import PolicyDenied, policy_check_request

EXAMPLES = 200
bounded = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- the path joiner -----------------------------------------------------------------------
BASES = [
    "https://api.anthropic.com",
    "https://gateway.example.com/anthropic",
    "http://127.0.0.1:8401/prefix/v2",
]
# What a request line can carry, plus what a client could smuggle inside one.
PATH_ALPHABET = st.sampled_from(
    [*"abcdefv0129/._-~%?#@:;=&+!$'()*,[]\\ ", "%2f", "%2e", "%5c", "%00", "..", "//"]
)
paths = st.lists(PATH_ALPHABET, max_size=24).map(lambda parts: "/" + "".join(parts))
any_paths = paths | st.text(max_size=40)
queries = st.text(
    alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=30
).map(str.encode)


@bounded
@given(base=st.sampled_from(BASES), path=any_paths, query=queries)
@example(base=BASES[1], path="/v1/messages#/../../x", query=b"beta=true")
@example(base=BASES[1], path="/v1/models?x=1", query=b"beta=true")
@example(base=BASES[0], path="/v1/%2e%2e/x", query=b"")
@example(base=BASES[0], path="/@evil.example/x", query=b"")
def test_a_joined_url_stays_under_the_base_and_keeps_the_query(
    base: str, path: str, query: bytes
) -> None:
    try:
        url = upstream_url(base, path, query)
    except PathRefused:
        return
    joined, wanted = urlsplit(url), urlsplit(base)
    assert (joined.scheme, joined.netloc) == (wanted.scheme, wanted.netloc)
    assert (joined.username, joined.password) == (None, None)
    # Under the base path, as the upstream reads it: decoded, dot segments resolved.
    upstream_path = unquote(joined.path)
    assert upstream_path == wanted.path + unquote(path)
    assert {".", ".."}.isdisjoint(upstream_path.split("/"))
    assert upstream_path.startswith(wanted.path + "/")
    assert joined.query == query.decode()
    assert joined.fragment == ""


@bounded
@given(
    backend=st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?\Z"),
    rest=st.binary(max_size=40),
)
def test_a_proxy_path_splits_into_its_backend_and_the_rest(backend: str, rest: bytes) -> None:
    raw = PROXY_PREFIX.encode() + backend.encode() + b"/" + rest
    try:
        parsed = proxy_path_parse(raw)
    except PathRefused:
        assert any(byte > 0x7F for byte in rest)
        return
    assert parsed is not None
    assert (parsed.backend, parsed.path) == (backend, "/" + rest.decode("ascii"))


@bounded
@given(raw=st.binary(max_size=60))
def test_a_path_outside_the_prefix_is_not_a_proxy_path(raw: bytes) -> None:
    assume(not raw.startswith(PROXY_PREFIX.encode()))
    assert proxy_path_parse(raw) is None


@bounded
@given(
    public=st.sampled_from(["http://127.0.0.1:8400", "https://kb.example.com/", "https://h/kb"]),
    backend=st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?\Z"),
)
def test_the_base_url_an_agent_is_given_leads_back_to_its_backend(
    public: str, backend: str
) -> None:
    base_url = proxy_base_url(public, backend)
    prefix = urlsplit(public).path.rstrip("/")
    path = urlsplit(base_url + "/v1/messages").path.removeprefix(prefix)
    assert proxy_path_parse(path.encode()) == proxy_path_parse(
        f"{PROXY_PREFIX}{backend}/v1/messages".encode()
    )
    parsed = proxy_path_parse(path.encode())
    assert parsed is not None
    assert (parsed.backend, parsed.path) == (backend, "/v1/messages")


# --- the SSE meter -------------------------------------------------------------------------
counts = st.integers(min_value=0, max_value=2**31)


@st.composite
def anthropic_streams(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """An Anthropic SSE stream in any of the shapes the format allows, and the usage a
    meter must read from it: message_start's, overridden by the last message_delta's."""
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    space = draw(st.sampled_from(["", " "]))
    model = draw(st.sampled_from(["claude-haiku-4-5", "claude-opus-4-1", "claude-sonnet-4-5"]))
    start = {name: draw(counts) for name in ("input_tokens", "output_tokens")}
    start |= draw(
        st.fixed_dictionaries(
            {},
            optional={
                "cache_read_input_tokens": counts,
                "cache_creation_input_tokens": counts,
            },
        )
    )
    frames: list[tuple[str | None, dict[str, Any] | str]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "usage": start,
        }}),
    ]  # fmt: skip
    expected = dict(start)
    stop = None
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "ping", "comment", "delta", "unnamed-delta"]))
        if kind == "text":
            text = draw(st.text(max_size=30))
            frames.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": text}}))  # fmt: skip
        elif kind == "ping":
            frames.append(("ping", {"type": "ping"}))
        elif kind == "comment":
            frames.append((None, draw(st.text(alphabet="abc :-", max_size=10))))
        else:
            usage = {"output_tokens": draw(counts)}
            stop = draw(st.sampled_from(["end_turn", "max_tokens", "tool_use"]))
            event = "message_delta" if kind == "delta" else None
            frames.append((event, {"type": "message_delta", "usage": usage,
                                   "delta": {"stop_reason": stop}}))  # fmt: skip
            expected.update(usage)
    frames.append(("message_stop", {"type": "message_stop"}))
    body = ""
    for event, data in frames:
        if isinstance(data, str):
            body += f":{data}{newline}{newline}"
            continue
        if event is not None:
            body += f"event:{space}{event}{newline}"
        body += f"data:{space}{json.dumps(data)}{newline}{newline}"
    return body.encode(), {"model": model, "tokens": expected, "stop_reason": stop or ""}


def metered(chunks: list[bytes], **kind: str) -> Any:
    meter = UsageMeter(content_type=kind.pop("content_type", "text/event-stream"), **kind)
    for chunk in chunks:
        meter.feed(chunk)
    return meter.finish()


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted({cut % (len(body) + 1) for cut in cuts}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


@bounded
@given(stream=anthropic_streams(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_a_stream_split_anywhere_meters_as_the_whole_stream(
    stream: tuple[bytes, dict[str, Any]], cuts: list[int]
) -> None:
    body, expected = stream
    whole = metered([body])
    assert (whole.model, whole.tokens, whole.stop_reason) == (
        expected["model"],
        expected["tokens"],
        expected["stop_reason"],
    )
    assert whole.unmetered == ""
    assert metered(split(body, cuts)) == whole


@bounded
@given(stream=anthropic_streams(), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_a_gzipped_stream_split_anywhere_meters_as_the_plain_one(
    stream: tuple[bytes, dict[str, Any]], cuts: list[int]
) -> None:
    body, _ = stream
    packed = gzip.compress(body)
    assert metered(split(packed, cuts), content_encoding="gzip") == metered([body])


@bounded
@given(
    chunks=st.lists(
        st.binary(max_size=200)
        | st.sampled_from([b"event: message_start\n", b"data: {", b"\r\n", b"\n\n", b"data:"])
        | st.text(max_size=60).map(str.encode),
        max_size=20,
    ),
    content_type=st.sampled_from(["text/event-stream", "application/json", "application/x-jsonl"]),
    content_encoding=st.sampled_from(["", "gzip", "deflate", "identity", "br"]),
)
def test_no_bytes_make_the_meter_fail(
    chunks: list[bytes], content_type: str, content_encoding: str
) -> None:
    meter = UsageMeter(
        content_type=content_type,
        content_encoding=content_encoding,
        jsonl=content_type.endswith("jsonl"),
    )
    for chunk in chunks:
        meter.feed(chunk)
    usage = meter.finish()
    # The meter turns its own exceptions into "meter failed (...)": none may happen.
    assert not usage.unmetered.startswith("meter failed"), usage.unmetered
    assert all(isinstance(value, int) for value in usage.tokens.values())


# --- the policy matchers -------------------------------------------------------------------
SEGMENT = st.text(alphabet="abcxyz019._-", min_size=1, max_size=6)
GLOB_SEGMENT = st.lists(
    st.sampled_from(["a", "b", "x", "1", ".", "-", "*", "?", "[ab]", "[!a]", "[0-9]"]),
    min_size=1,
    max_size=4,
).map("".join)


def glob_or_none(pattern: str) -> str | None:
    try:
        return glob_check("paths", pattern)
    except ServiceError:
        return None


@bounded
@given(
    pattern=st.lists(GLOB_SEGMENT, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s)),
    path=st.lists(SEGMENT, min_size=1, max_size=5).map(lambda s: "/" + "/".join(s)),
)
def test_a_path_glob_without_double_star_matches_segment_by_segment(
    pattern: str, path: str
) -> None:
    """Without ``**``, a glob is fnmatch applied to each segment, with as many segments."""
    assume("**" not in pattern and glob_or_none(pattern) is not None)
    pieces, wanted = path.split("/"), pattern.split("/")
    by_segment = len(pieces) == len(wanted) and all(
        fnmatch.fnmatchcase(piece, glob) for piece, glob in zip(pieces, wanted, strict=True)
    )
    assert path_allowed(path, [pattern]) is by_segment


@bounded
@given(
    prefix=st.lists(SEGMENT, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)),
    rest=st.text(alphabet="abc/.-%", max_size=12),
)
def test_star_never_crosses_a_slash_and_double_star_does(prefix: str, rest: str) -> None:
    assert path_allowed(prefix + rest, [prefix + "*"]) is ("/" not in rest)
    assert path_allowed(prefix + rest, [prefix + "**"])
    assert path_allowed(prefix + rest, [prefix]) is (rest == "")


MODELS = st.sampled_from(
    ["claude-haiku-4-5", "claude-opus-4-1", "claude-sonnet-4-5", "Claude-haiku-4-5", "gpt-4o"]
) | st.text(alphabet="claude-hiku0145*?[]", max_size=20)
MODEL_GLOBS = st.lists(
    st.sampled_from(["claude-haiku-*", "claude-*-4-5", "claude-opus-4-1", "claude-?????-4-5"]),
    min_size=1,
    max_size=3,
)


def check(policy: Policy, body: bytes) -> str | None:
    """None when the policy lets the body through, else the rule that refused it."""
    try:
        policy_check_request(
            policy, path="/v1/messages", headers=[], body=body, agent="bob", backend="anthropic"
        )
    except PolicyDenied as denied:
        return denied.rule
    return None


@bounded
@given(model=MODELS, globs=MODEL_GLOBS)
def test_a_model_is_allowed_exactly_when_a_pattern_matches_it(model: str, globs: list[str]) -> None:
    policy = Policy(grant_id=1, models=tuple(globs))
    allowed = any(fnmatch.fnmatchcase(model, glob) for glob in globs)
    body = json.dumps({"model": model, "max_tokens": 8, "messages": []}).encode()
    assert check(policy, body) == (None if allowed else "models")
    batch = json.dumps({"requests": [{"custom_id": "a", "params": {"model": model}}]}).encode()
    assert check(policy, batch) == (None if allowed else "models")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10_000) | st.floats(allow_nan=False) | MODELS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
KEYS = st.sampled_from(["model", "max_tokens", "messages", "mod\\u0065l", "max_token\\u0073", "x"])


@st.composite
def bodies_with_repeated_keys(draw: st.DrawFn) -> bytes:
    """A JSON object written by hand, so that keys may repeat and be escaped."""
    pairs = draw(st.lists(st.tuples(KEYS, JSON_VALUES), max_size=5))
    fields = ", ".join(f'"{key}": {json.dumps(value)}' for key, value in pairs)
    return ("{" + fields + "}").encode()


@settings(max_examples=EXAMPLES, deadline=None)
@given(body=bodies_with_repeated_keys(), globs=MODEL_GLOBS, cap=st.integers(1, 4096))
def test_what_passes_the_policy_is_what_the_upstream_reads(
    body: bytes, globs: list[str], cap: int
) -> None:
    """Whichever of a repeated key's values the upstream's JSON reader keeps (the last, as
    Python's; or the first), what passed keybroker's check is allowed."""
    if check(Policy(grant_id=1, models=tuple(globs), max_tokens=cap), body) is not None:
        return
    last = json.loads(body)
    first = json.loads(body, object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    for read in (last, first):
        if "model" in read:
            assert isinstance(read["model"], str)
            assert any(fnmatch.fnmatchcase(read["model"], glob) for glob in globs)
        if "max_tokens" in read:
            assert type(read["max_tokens"]) is int
            assert read["max_tokens"] <= cap


@pytest.mark.parametrize("pattern", ["/v1/**", "/v1/messages*", "/v1/[a-m]*/*"])
@bounded
@given(path=any_paths)
def test_a_path_the_glob_allows_is_the_path_the_upstream_gets(pattern: str, path: str) -> None:
    """The policy matches the decoded path; the upstream gets that same path under the base."""
    try:
        url = upstream_url(BASES[1], path, b"")
    except PathRefused:
        return
    received = unquote(urlsplit(url).path).removeprefix(urlsplit(BASES[1]).path)
    assert path_allowed(unquote(path), [pattern]) is path_allowed(received, [pattern])
