"""Every proxied answer says how long keybroker itself took: ``Server-Timing: keybroker;dur=``.

Not a timing test: the value's presence and form, and that the upstream's own time is left
out of it (the fake upstream waits before answering; that wait must not be in the value).
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGE = {
    "model": "claude-haiku-4-5",
    "max_tokens": 32,
    "messages": [{"role": "user", "content": "Hi"}],
}
KEYBROKER_TIMING = re.compile(r"^keybroker;dur=(\d+(?:\.\d+)?)$")
UPSTREAM_WAIT = 0.3  # the fake upstream sleeps this long before it answers


def keybroker_ms(response: httpx.Response) -> float:
    values = response.headers.get_list("server-timing")
    ours = [v for v in values if v.startswith("keybroker")]
    assert len(ours) == 1, f"one keybroker Server-Timing expected, got {values}"
    match = KEYBROKER_TIMING.match(ours[0])
    assert match, f"not keybroker;dur=<ms>: {ours[0]!r}"
    return float(match[1])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_proxied_answer_carries_keybrokers_own_time_without_the_upstreams(
    proxied: Proxied, fake_anthropic: FakeAnthropic, stream: bool
) -> None:
    fake_anthropic.hang_seconds = UPSTREAM_WAIT
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        f"{proxied.base_url}/v1/messages",
        headers={"x-api-key": proxied.token},
        json={**MESSAGE, "stream": stream},
        timeout=30,
    ) as response:
        body = response.read()
    wall_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200
    assert (b"message_stop" in body) is stream
    assert response.headers["content-type"].startswith(
        "text/event-stream" if stream else "application/json"
    )
    dur = keybroker_ms(response)
    assert dur >= 0
    # The whole call took the upstream's wait and more; keybroker's part excludes the wait.
    assert wall_ms >= UPSTREAM_WAIT * 1000
    assert dur < wall_ms - UPSTREAM_WAIT * 1000
