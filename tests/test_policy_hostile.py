"""Limits as an attacker tries them (issue 19): batches, compression the meter cannot read,
concurrency, content types that hide a body, and bursts bigger than a connection pool."""

from __future__ import annotations

import asyncio
import json
import resource
import time
import zlib
from typing import Any

import anthropic
import httpx
import pytest

from audit.models import AuditEvent
from broker.infra.redis import redis_client
from proxy.policy import process_load
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained
from tests.test_policy_proxy import (
    HAIKU,
    HELLO,
    OPUS,
    post,
    sdk,
    set_policy,
    used,
    wait_until_counted,
)
from tests.waiting import until

pytestmark = pytest.mark.django_db(transaction=True)

# The fake's answer: 12 input, 6 output and 3 cache-read tokens; all of them count.
ANSWER_TOKENS = 21
STREAM_TOKENS = 25  # a stream of five deltas: 10 output tokens


def batch_requests(count: int, max_tokens: int = 100) -> list[dict[str, Any]]:
    params = {"model": HAIKU, "max_tokens": max_tokens, "messages": HELLO}
    return [{"custom_id": f"r{i}", "params": params} for i in range(count)]


def proxy_requests() -> list[AuditEvent]:
    audit_drained()
    return list(AuditEvent.objects.filter(action="proxy.request").order_by("id"))


# --- message batches -----------------------------------------------------------------------
def test_each_request_of_a_batch_takes_a_slot_of_the_rpm(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.POLICY_WINDOW_SECONDS = 3600
    set_policy(rpm=6)
    client = sdk(proxied)
    client.messages.batches.create(requests=batch_requests(5))
    client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)  # the sixth
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    assert "6 requests per 3600s used up" in limited.value.message
    assert used("rpm") == 6


def test_a_batch_bigger_than_the_rpm_is_refused_for_good(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(rpm=10)
    with pytest.raises(anthropic.RateLimitError) as limited:
        sdk(proxied).messages.batches.create(requests=batch_requests(11))
    assert "this batch takes 11 requests, over the rpm of 10" in limited.value.message
    assert limited.value.response.headers["x-should-retry"] == "false"
    assert fake_anthropic.requests == []
    assert used("rpm") == 0  # a refused batch takes no slot


def test_a_batch_reserves_its_max_tokens_and_its_results_settle_the_usage(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=100_000)
    client = sdk(proxied)
    batch = client.messages.batches.create(requests=batch_requests(50))
    body_size = len(fake_anthropic.requests[-1].body)
    reserved = 50 * 100 + -(-body_size // 4)
    wait_until_counted("daily_tokens", reserved)

    fake_anthropic.results_errored.add("r7")  # an errored request used nothing
    results = list(client.messages.batches.results(batch.id))
    assert len(results) == 50
    wait_until_counted("daily_tokens", 49 * ANSWER_TOKENS)

    # Reading the results again counts nothing more.
    assert len(list(client.messages.batches.results(batch.id))) == 50
    wait_until_counted("daily_tokens", 49 * ANSWER_TOKENS)
    read = [e for e in proxy_requests() if e.path.endswith("/results")]
    assert read[0].detail["batch_requests"] == 50
    assert read[0].detail["batch_id"] == batch.id
    assert read[0].input_tokens == 49 * 12


def test_a_batch_that_does_not_fit_in_the_budget_left_is_refused(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=1_000)
    with pytest.raises(anthropic.RateLimitError) as limited:
        sdk(proxied).messages.batches.create(requests=batch_requests(50))
    assert "a batch of 50 requests reserving" in limited.value.message
    assert "does not fit" in limited.value.message
    assert fake_anthropic.requests == []
    assert used("daily_tokens") == 0


def test_a_refused_batch_gives_its_reservation_back(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=100_000)
    fake_anthropic.answer_next(
        400, {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
    )
    with pytest.raises(anthropic.BadRequestError):
        sdk(proxied).messages.batches.create(requests=batch_requests(3))
    wait_until_counted("daily_tokens", 0)


# --- reservations under concurrency --------------------------------------------------------
def test_concurrent_streams_overrun_a_budget_by_at_most_one_call(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=100)
    fake_anthropic.stream_gap_seconds = 0.05  # every stream is still open when the next asks

    async def one(client: anthropic.AsyncAnthropic) -> bool:
        try:
            async with client.messages.stream(model=HAIKU, max_tokens=64, messages=HELLO) as stream:
                await stream.get_final_message()
            return True
        except anthropic.RateLimitError:
            return False

    async def burst() -> list[bool]:
        client = anthropic.AsyncAnthropic(
            base_url=proxied.base_url, api_key=proxied.token, max_retries=0
        )
        async with client:
            return await asyncio.gather(*(one(client) for _ in range(30)))

    passed = sum(asyncio.run(burst()))
    # The first reserves 64 + its input's estimate, under the budget; the second takes it
    # over; everyone after is refused until the usage is known.
    assert passed == 2
    wait_until_counted("daily_tokens", 2 * STREAM_TOKENS)


def test_a_call_that_fails_upstream_gives_its_reservation_back(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=1_000)
    fake_anthropic.answer_next(
        529, {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    )
    with pytest.raises(anthropic.InternalServerError):
        sdk(proxied).messages.create(model=HAIKU, max_tokens=500, messages=HELLO)
    wait_until_counted("daily_tokens", 0)


# --- compression ---------------------------------------------------------------------------
def test_the_upstream_is_never_asked_for_a_coding_the_meter_cannot_read(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=100_000)
    for _ in range(3):
        answer = post(
            proxied,
            "/v1/messages",
            json={"model": HAIKU, "max_tokens": 8, "messages": HELLO},
            headers={"accept-encoding": "br, zstd"},
        )
        assert answer.status_code == 200
        assert answer.headers.get("content-encoding") is None
    assert {r.headers["accept-encoding"] for r in fake_anthropic.requests} == {"identity"}
    wait_until_counted("daily_tokens", 3 * ANSWER_TOKENS)
    assert [e.input_tokens for e in proxy_requests()] == [12, 12, 12]


def test_gzip_is_still_asked_for_when_the_client_takes_it(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.gzip_json = True
    answer = post(
        proxied,
        "/v1/messages",
        json={"model": HAIKU, "max_tokens": 8, "messages": HELLO},
        headers={"accept-encoding": "br;q=1.0, gzip;q=0.5"},
    )
    assert answer.status_code == 200
    assert fake_anthropic.requests[-1].headers["accept-encoding"] == "gzip;q=0.5"
    assert [e.output_tokens for e in proxy_requests()] == [6]


def test_an_answer_the_meter_cannot_read_keeps_its_reservation_and_says_so(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=100_000)
    # An upstream that answers br although it was asked for identity.
    fake_anthropic.answer_next(200, {"usage": {"input_tokens": 10_000}}, content_encoding="br")
    request = {"model": HAIKU, "max_tokens": 400, "messages": HELLO}
    post(proxied, "/v1/messages", json=request)
    reserved = 400 + -(-len(fake_anthropic.requests[-1].body) // 4)
    wait_until_counted("daily_tokens", reserved)
    (event,) = proxy_requests()
    assert event.detail["unmetered"] == "content-encoding br not readable"


# --- content types -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type", ["multipart/form-data; boundary=x", "multipart/mixed", "text/plain"]
)
def test_a_json_body_under_another_content_type_is_still_checked(
    proxied: Proxied, fake_anthropic: FakeAnthropic, content_type: str
) -> None:
    set_policy(models=["claude-haiku-*"], max_tokens=100)
    for bad in ({"model": OPUS, "max_tokens": 8}, {"model": HAIKU, "max_tokens": 4096}):
        answer = post(
            proxied,
            "/v1/messages",
            content=json.dumps({**bad, "messages": HELLO}),
            headers={"content-type": content_type},
        )
        assert answer.status_code == 403, answer.text
    assert fake_anthropic.requests == []


def test_a_real_multipart_upload_still_goes_through(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(models=["claude-haiku-*"])
    answer = httpx.post(
        f"{proxied.base_url}/v1/files",
        headers={"x-api-key": proxied.token},
        files={"file": ("notes.txt", b"some notes", "text/plain")},
        timeout=30,
    )
    assert answer.status_code != 403, answer.text
    assert [r.path for r in fake_anthropic.requests] == ["/v1/files"]


# --- connection pools ----------------------------------------------------------------------
def test_a_burst_bigger_than_redis_pools_waits_instead_of_failing(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PROXY_REDIS_CONNECTIONS = 32  # a burst of 250 must wait for connections
    # Waiting, not failing at once as redis-py's default pool does, is the point; how long
    # 250 calls queue behind 32 connections depends on the machine.
    settings.PROXY_REDIS_WAIT_SECONDS = 30
    set_policy(rpm=100_000, daily_tokens=10**9)

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            # Redis holds every command for a moment: the whole burst needs a connection
            # at once, as it would behind a slow Redis.
            redis_client().execute_command("CLIENT", "PAUSE", 700)
            calls = [
                client.post(
                    f"{proxied.base_url}/v1/messages",
                    headers={"x-api-key": proxied.token},
                    json={"model": HAIKU, "max_tokens": 8, "messages": HELLO},
                )
                for _ in range(250)
            ]
            return [answer.status_code for answer in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 250
    wait_until_counted("daily_tokens", 250 * ANSWER_TOKENS)  # every call counted, none lost


# --- response headers ----------------------------------------------------------------------
def test_the_upstreams_server_and_date_headers_do_not_pass(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.answer_next(
        200, {"usage": {}}, server="fake-upstream/1.0", date="Mon, 01 Jan 2001 00:00:00 GMT"
    )
    answer = post(proxied, "/v1/messages", json={"model": HAIKU, "max_tokens": 8})
    assert answer.status_code == 200
    assert "fake-upstream" not in answer.headers.get("server", "")
    dates = answer.headers.get_list("date")
    assert len(dates) <= 1
    assert "2001" not in "".join(dates)


# --- memory: calls in flight and bodies held -----------------------------------------------
def test_max_concurrent_refuses_the_call_over_the_limit_while_the_others_stream(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(max_concurrent=2)
    fake_anthropic.stream_gap_seconds = 0.1

    async def one(client: anthropic.AsyncAnthropic) -> str:
        try:
            async with client.messages.stream(model=HAIKU, max_tokens=64, messages=HELLO) as stream:
                await stream.get_final_message()
            return "ok"
        except anthropic.RateLimitError as limited:
            return f"{limited.message} (retry-after {limited.response.headers['retry-after']})"

    async def burst() -> list[str]:
        client = anthropic.AsyncAnthropic(
            base_url=proxied.base_url, api_key=proxied.token, max_retries=0
        )
        async with client:
            return await asyncio.gather(*(one(client) for _ in range(5)))

    outcomes = asyncio.run(burst())
    assert outcomes.count("ok") == 2
    refused = [o for o in outcomes if o != "ok"]
    assert len(refused) == 3
    assert all("policy max_concurrent: 2 calls already in flight" in o for o in refused)
    assert all(o.endswith("(retry-after 1)") for o in refused)
    # Once they have ended, calls go through again.
    assert sdk(proxied).messages.create(model=HAIKU, max_tokens=8, messages=HELLO).usage
    assert len(fake_anthropic.requests) == 3


def test_bodies_over_the_process_budget_get_503_and_nothing_is_lost(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PROXY_BUFFERED_BODY_BYTES = 3 * 1024 * 1024
    fake_anthropic.hang_seconds = 1.0  # the first call holds its body while the second asks
    big = {"model": HAIKU, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 2**21}]}

    async def two() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.ensure_future(
                client.post(
                    f"{proxied.base_url}/v1/messages",
                    headers={"x-api-key": proxied.token},
                    json=big,
                )
            )
            await until(lambda: fake_anthropic.requests, timeout=5, what="the first call upstream")
            second = await client.post(
                f"{proxied.base_url}/v1/messages", headers={"x-api-key": proxied.token}, json=big
            )
            return [await first, second]

    first, second = asyncio.run(two())
    assert first.status_code == 200
    assert second.status_code == 503
    assert second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "overloaded_error"
    assert len(fake_anthropic.requests) == 1
    fake_anthropic.hang_seconds = 0
    assert post(proxied, "/v1/messages", json=big).status_code == 200  # the budget came back


def test_a_body_nothing_reads_streams_upstream_instead_of_being_held(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    piece = bytes(range(256)) * 1024  # 256 KB
    held: list[int] = []

    def upload() -> Any:
        for _ in range(32):  # 8 MB
            held.append(process_load.body_bytes)  # the server runs in this process
            yield piece
            time.sleep(0.005)  # an upload that takes a while: what is held meanwhile shows

    answer = httpx.post(
        f"{proxied.base_url}/v1/files",
        headers={
            "x-api-key": proxied.token,
            "content-type": "application/octet-stream",
            "content-length": str(32 * len(piece)),
        },
        content=upload(),
        timeout=30,
    )
    assert answer.status_code == 404, answer.text  # the fake has no files API: it got there
    (seen,) = fake_anthropic.requests
    assert seen.body == piece * 32
    # Never more than the read-ahead (1 MB) and a chunk in flight was held at once.
    assert max(held) <= 1024 * 1024 + 2 * len(piece)
    assert process_load.body_bytes == 0


def test_a_streamed_body_over_the_size_limit_is_refused(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.PROXY_MAX_BODY_BYTES = 3 * 1024 * 1024

    def chunks() -> Any:
        for _ in range(8):
            yield b"y" * (512 * 1024)

    try:
        answer = httpx.post(
            f"{proxied.base_url}/v1/files",
            headers={"x-api-key": proxied.token, "content-type": "application/octet-stream"},
            content=chunks(),
            timeout=30,
        )
    except httpx.HTTPError:
        answer = None  # the server may close before the client has sent everything
    if answer is not None:
        assert answer.status_code == 413
    assert all(len(r.body) <= 3 * 1024 * 1024 for r in fake_anthropic.requests)
    audit_drained()
    (event,) = AuditEvent.objects.filter(path="/v1/files")
    assert event.status == 413


# --- hostile upstreams ---------------------------------------------------------------------
def test_a_gzip_bomb_is_forwarded_whole_but_never_decompressed_whole(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(daily_tokens=100_000)
    # 256 MB of JSON in about 256 KB, built without ever holding it.
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(b'{"usage": {"input_tokens": 5}, "pad": "')]
    spaces = b" " * (1024 * 1024)
    parts += [packer.compress(spaces) for _ in range(256)]
    parts += [packer.compress(b'"}'), packer.flush()]
    bomb = b"".join(parts)
    fake_anthropic.answer_next(200, bomb, content_encoding="gzip")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with httpx.stream(
        "POST",
        f"{proxied.base_url}/v1/messages",
        headers={"x-api-key": proxied.token, "accept-encoding": "gzip"},
        json={"model": HAIKU, "max_tokens": 8, "messages": HELLO},
        timeout=60,
    ) as answer:
        # Raw bytes: httpx would otherwise inflate the bomb in this very process.
        received = b"".join(answer.iter_raw())
    # The client gets the upstream's bytes; the meter gave up without holding 256 MB.
    assert answer.status_code == 200
    assert answer.headers["content-encoding"] == "gzip"
    assert received == bomb
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < 128 * 1024 * 1024
    (event,) = proxy_requests()
    assert event.detail["unmetered"]
