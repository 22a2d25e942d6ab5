"""uvicorn's access log leaves proxied calls out unless asked (KEYBROKER_PROXY_ACCESS_LOG):
each has its audit event, and formatting the line was a tenth of the proxy's own time
(issue 13, docs/decisions.md). Every other path keeps its line."""

from __future__ import annotations

import tempfile

import httpx
import pytest

from tests.conftest import free_port
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied
from tests.servers import process_env, uvicorn_started
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def access_log_of(proxied: Proxied, **settings: str) -> str:
    """The access log of a web process started as `serve` starts it, after one proxied
    call and one call to /health."""
    with tempfile.TemporaryFile() as stdout:
        with uvicorn_started(
            port=free_port(), env=process_env(**settings), log_level="info", stdout=stdout
        ) as (url, _):
            proxied_url = f"{url}/v1/proxy/anthropic/v1/models"
            assert httpx.get(proxied_url, headers={"x-api-key": proxied.token}).status_code == 200
            assert httpx.get(f"{url}/health?after=proxy").status_code == 200

            def logged() -> bool:
                stdout.seek(0)
                return b"/health?after=proxy" in stdout.read()

            wait_until(logged, timeout=15, what="uvicorn to log the /health call")
        stdout.seek(0)
        return stdout.read().decode()


def test_proxied_calls_have_no_access_log_line_by_default(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    log = access_log_of(proxied)
    assert '"GET /health?after=proxy HTTP/1.1" 200' in log
    assert "/v1/proxy/" not in log
    assert len(fake_anthropic.requests) == 1  # the call did go through


def test_keybroker_proxy_access_log_brings_the_line_back(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    log = access_log_of(proxied, KEYBROKER_PROXY_ACCESS_LOG="true")
    assert '"GET /v1/proxy/anthropic/v1/models HTTP/1.1" 200' in log
    assert proxied.token not in log
