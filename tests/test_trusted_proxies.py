"""Issue 19, item 10: X-Forwarded-For counts only from KEYBROKER_TRUSTED_PROXIES.

uvicorn's own default believes forwarded headers from 127.0.0.1, and `serve` listens on
loopback, so every local client could forge the address that the enrollment flood limit,
``enrolled_from`` and the audit record. These tests start uvicorn exactly as `serve` does
(its command builder) in a subprocess on the test database, and send a forged header.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured

from audit.models import AuditEvent
from broker.models import Agent
from broker.project.settings import _trusted_proxies
from broker.runtime.serve import proxy_header_options, uvicorn_command
from tests.conftest import free_port
from tests.servers import process_env, uvicorn_serving
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

FORGED = "203.0.113.7"


@pytest.fixture
def serve_uvicorn(settings: Any, anthropic: Any) -> Iterator[Any]:
    """Starts the web process `serve` would start with the given trusted proxies (and a
    backend named anthropic for the agents to ask for)."""
    with ExitStack() as started:

        def start(trusted: list[str], **extra_env: str) -> str:
            settings.TRUSTED_PROXIES = trusted  # what serve's uvicorn options are built from
            env = process_env(
                KEYBROKER_TRUSTED_PROXIES=",".join(trusted),
                # uvicorn's own fallback for --forwarded-allow-ips: serve's options must win.
                FORWARDED_ALLOW_IPS="*",
                **extra_env,
            )
            return started.enter_context(uvicorn_serving(port=free_port(), env=env))

        yield start


def enrolled_from(url: str, name: str) -> tuple[str | None, str | None]:
    """Enrolls with a forged X-Forwarded-For; the address on the agent and on its event."""
    response = httpx.post(
        f"{url}/v1/enroll",
        json={"name": name, "scopes": ["anthropic"]},
        headers={"X-Forwarded-For": FORGED},
    )
    assert response.status_code == 201, response.text
    agent = Agent.objects.get(name=name)
    event = wait_until(
        AuditEvent.objects.filter(action="agent.enrolled", agent=agent).first,
        timeout=10,
        what="the server to write agent.enrolled",
    )
    return agent.enrolled_from, event.client_address


@pytest.mark.parametrize("trusted", [[], ["10.0.0.0/8", "192.0.2.1"]])
def test_a_forged_forwarded_for_from_an_untrusted_client_is_ignored(
    serve_uvicorn: Any, trusted: list[str]
) -> None:
    url = serve_uvicorn(trusted)
    assert enrolled_from(url, "bob") == ("127.0.0.1", "127.0.0.1")


def test_rotating_forged_addresses_share_the_real_addresss_enrollment_budget(
    serve_uvicorn: Any,
) -> None:
    """The issue's flood: each enrollment with another forged X-Forwarded-For got a fresh
    rate-limit bucket. Now they all count against 127.0.0.1."""
    url = serve_uvicorn([], KEYBROKER_ENROLL_RATE="3/10m")
    statuses = [
        httpx.post(
            f"{url}/v1/enroll",
            json={"name": f"flood{n}", "scopes": ["anthropic"]},
            headers={"X-Forwarded-For": f"203.0.113.{n + 1}"},
        ).status_code
        for n in range(5)
    ]
    assert statuses == [201, 201, 201, 429, 429]
    assert set(Agent.objects.values_list("enrolled_from", flat=True)) == {"127.0.0.1"}


def test_a_trusted_proxys_forwarded_for_is_the_client_address(serve_uvicorn: Any) -> None:
    url = serve_uvicorn(["127.0.0.1"])
    assert enrolled_from(url, "bob") == (FORGED, FORGED)


def test_serve_passes_uvicorn_the_trusted_proxies_or_no_proxy_headers(settings: Any) -> None:
    settings.TRUSTED_PROXIES = []
    assert proxy_header_options() == ["--no-proxy-headers"]
    settings.TRUSTED_PROXIES = ["10.0.0.5", "10.1.0.0/16"]
    assert proxy_header_options() == [
        "--proxy-headers",
        "--forwarded-allow-ips=10.0.0.5,10.1.0.0/16",
    ]
    command = uvicorn_command("python", host="127.0.0.1", port=8400, workers=2)
    assert "--forwarded-allow-ips=10.0.0.5,10.1.0.0/16" in command


def test_the_setting_takes_ips_and_networks_only() -> None:
    assert _trusted_proxies("") == []
    assert _trusted_proxies(" 10.0.0.5, 10.1.0.0/16 ,::1,") == ["10.0.0.5", "10.1.0.0/16", "::1"]
    for bad in ["*", "proxy.internal", "10.0.0.0/33", "10.0.0.5,*"]:
        with pytest.raises(ImproperlyConfigured, match="KEYBROKER_TRUSTED_PROXIES"):
            _trusted_proxies(bad)
