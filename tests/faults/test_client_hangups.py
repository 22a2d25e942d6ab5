"""Clients that hang up: mid-request, while the upstream thinks, and mid-stream. The
upstream connection of the call is closed at once (the chaos upstream sees it go), the web
process keeps no connection of the call, and the audit event says the client went."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from django.contrib.auth.models import AbstractBaseUser

from audit.models import AuditEvent
from broker.services.backends import backend_add
from tests.conftest import free_port
from tests.faults.cast import MESSAGE, agent_token
from tests.faults.chaos import SILENCE_SECONDS, ChaosUpstream, chaos_in_thread
from tests.faults.figures import Figure, Figures
from tests.faults.processes import WebProcess, web_process
from tests.keys import api_key
from tests.servers import process_env
from tests.waiting import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

PROXY_PATH = "/v1/proxy/anthropic/v1/messages"


@pytest.fixture(scope="module")
def patient_web(django_db_setup: None) -> Iterator[WebProcess]:
    """A web process as shipped, but for its idle timeout: 30 s, far longer than any case
    here, so that only noticing the client's hang-up can close an upstream call early."""
    with web_process(process_env(KEYBROKER_PROXY_IDLE_TIMEOUT="30")) as web:
        yield web


@pytest.fixture
def upstream() -> Iterator[ChaosUpstream]:
    """A chaos upstream of this test's own: its connections are this test's calls alone."""
    chaos = chaos_in_thread(free_port())
    yield chaos
    chaos.stop()
    assert chaos.failures == []


@pytest.fixture
def token(upstream: ChaosUpstream, alice: AbstractBaseUser) -> str:
    backend_add(name="anthropic", secret=api_key(tail="H4ng"), base_url=upstream.url)
    return agent_token("hangs-up", alice).plaintext


@pytest.fixture
def warm(patient_web: WebProcess, upstream: ChaosUpstream, token: str) -> None:
    """A first stream, cut by the upstream: the token is cached and the web process's pools
    are open, so the case's call is like any later one."""
    with (
        httpx.stream(
            "POST",
            f"{patient_web.url}{PROXY_PATH}",
            json={**MESSAGE, "stream": True},
            headers={"x-api-key": token, "x-chaos": "cut-mid-event"},
            timeout=10,
        ) as response,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        response.read()
    the_event(1)
    wait_until(lambda: upstream.open_connections == 0, timeout=5, what="the first call's end")
    upstream.connections = 0
    upstream.abandoned.clear()


def the_event(count: int = 2) -> AuditEvent:
    """The latest call's audit event, once the web process wrote all ``count`` of them (the
    warm-up's first): one written after the test would land in the next test's database."""
    calls = AuditEvent.objects.filter(action="proxy.request").order_by("-id")
    wait_until(
        lambda: calls.count() >= count,
        timeout=10,
        what=lambda: f"{count} audit events (there are {calls.count()})",
    )
    assert calls.count() == count
    return calls[0]


def settled(web: WebProcess, upstream: ChaosUpstream) -> None:
    """The call left nothing open: no connection to the upstream (on either side) and none
    with a client; the pools' connections to Redis and the database are not the call's."""
    upstream_port = int(upstream.url.rsplit(":", 1)[1])
    web_port = int(web.url.rsplit(":", 1)[1])

    def lingering() -> list[tuple[int, int]]:
        return [c for c in web.connections() if upstream_port in c or web_port in c]

    wait_until(
        lambda: upstream.open_connections == 0 and not lingering(),
        timeout=5,
        what=lambda: (
            f"the call's connections to close ({upstream.open_connections} at the "
            f"upstream; the web process's to the upstream or a client: {lingering()})"
        ),
    )


def test_a_client_that_hangs_up_mid_stream(
    patient_web: WebProcess,
    upstream: ChaosUpstream,
    token: str,
    warm: None,
    figures: Figures,
) -> None:
    with httpx.stream(
        "POST",
        f"{patient_web.url}{PROXY_PATH}",
        json={**MESSAGE, "stream": True},
        headers={"x-api-key": token, "x-chaos": "slow-stream"},
        timeout=10,
    ) as response:
        chunks = response.iter_raw()
        next(chunks)
        next(chunks)
    hung_up = time.monotonic()
    # The stream would go on for 30 s: the upstream sees its reader go long before.
    wait_until(lambda: upstream.abandoned == ["slow-stream"], timeout=3, what="the stream to close")
    noticed = time.monotonic() - hung_up
    settled(patient_web, upstream)
    assert the_event().outcome == "client_gone"
    figures.add(
        Figure(
            case="A client hangs up mid-stream",
            load="1 stream of 30 s",
            faults="the client closes after 2 chunks",
            refused="-",
            lost=0,
            holds=f"upstream closed {noticed:.1f} s after; no connection left; audited client_gone",
        )
    )


def test_a_client_that_hangs_up_while_the_upstream_thinks(
    patient_web: WebProcess,
    upstream: ChaosUpstream,
    token: str,
    warm: None,
    figures: Figures,
) -> None:
    """A long non-streamed message: the client gives up before any answer comes."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{patient_web.url}{PROXY_PATH}",
            json=MESSAGE,
            headers={"x-api-key": token, "x-chaos": "slow-headers"},
            timeout=0.5,
        )
    hung_up = time.monotonic()
    wait_until(
        lambda: upstream.abandoned == ["slow-headers"],
        timeout=SILENCE_SECONDS - 1,
        what="the upstream request to be closed before the upstream answers",
    )
    noticed = time.monotonic() - hung_up
    settled(patient_web, upstream)
    assert the_event().outcome == "client_gone"
    figures.add(
        Figure(
            case="A client hangs up before the answer's headers",
            load="1 call the upstream answers after 3 s",
            faults="the client gives up after 0.5 s",
            refused="-",
            lost=0,
            holds=f"upstream closed {noticed:.1f} s after; no connection left; audited client_gone",
        )
    )


def test_a_client_that_hangs_up_mid_request_body(
    patient_web: WebProcess,
    upstream: ChaosUpstream,
    token: str,
    warm: None,
    figures: Figures,
) -> None:
    host, port = patient_web.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as client:
        client.sendall(
            f"POST {PROXY_PATH} HTTP/1.1\r\nHost: {host}\r\nx-api-key: {token}\r\n"
            "content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
            '{"model": "claude-haiku-4-5", '.encode()
        )
    settled(patient_web, upstream)
    assert upstream.connections == 0  # nothing went upstream
    assert the_event().outcome == "client_gone"
    figures.add(
        Figure(
            case="A client hangs up mid-request body",
            load="1 call, 30 of 100,000 body bytes sent",
            faults="the client closes its socket",
            refused="-",
            lost=0,
            holds="nothing sent upstream; no connection left; audited client_gone",
        )
    )
