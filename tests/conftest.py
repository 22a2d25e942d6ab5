from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from broker.infra.redis import redis_client
from broker.runtime.embedded_redis import start_embedded_redis
from tests.fake_anthropic import FakeAnthropic, serve_in_thread

REPO = Path(__file__).resolve().parent.parent
# Fixtures shared across test modules live in these plugins, registered here once: a test
# module asks for a fixture by name and never imports it. A plugin another one imports comes
# first, so pytest's assertion rewriting sees it before the import does.
pytest_plugins = [
    "tests.servers",
    "tests.agents",
    "tests.browser",
    "tests.proxy_cast",
    "tests.wif",
    "tests.fake_openai",
    "tests.webhook_receiver",
]


@pytest.fixture(scope="session", autouse=True)
def _no_internet() -> Iterator[None]:
    """The suite talks to loopback only, on any machine: a host name other than localhost
    does not resolve, as in a sandbox without DNS. Adding or rotating a key asks its
    upstream at once (issue 20, item 1); a test that forgot to point its backend at the
    fake upstream must find api.anthropic.com unreachable, not get a real 401 from it."""
    real = socket.getaddrinfo

    def loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or name == "localhost" or _is_address(name):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"the tests reach no internet host ({name})")

    socket.getaddrinfo = loopback_only  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.getaddrinfo = real


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def redis_server() -> Iterator[None]:
    """The suite's Redis: REDIS_URL when given (CI), else the embedded one, as `serve` runs it."""
    if not settings.REDIS_EMBEDDED:
        yield
        return
    process = start_embedded_redis(
        data_dir=settings.DATA_DIR,
        socket_path=settings.REDIS_SOCKET,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(autouse=True)
def _clean_redis(redis_server: None) -> Iterator[None]:
    yield
    client = redis_client()
    keys = list(client.scan_iter(f"{settings.REDIS_KEY_PREFIX}:*", count=500))
    if keys:
        client.delete(*keys)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment for a keybroker subprocess: no inherited keybroker or service settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KEYBROKER_", "DJANGO_"))
        and key not in {"DATABASE_URL", "REDIS_URL"}
    }
    # A developer's own .env in the checkout must not reach the processes tests start.
    env["KEYBROKER_ENV_FILE"] = os.devnull
    env.update(overrides)
    return env


@contextmanager
def served(app: Any) -> Iterator[str]:
    """``app`` (a fake's ASGI app) on a free loopback port while the block runs; its URL."""
    port = free_port()
    server = serve_in_thread(app, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True


@pytest.fixture(scope="session")
def _fake_anthropic_server() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic()
    with served(fake) as fake.url:
        yield fake


@pytest.fixture
def fake_anthropic(_fake_anthropic_server: FakeAnthropic) -> Iterator[FakeAnthropic]:
    """The fake upstream, fresh for each test: no valid keys, no requests seen."""
    _fake_anthropic_server.reset()
    yield _fake_anthropic_server
    _fake_anthropic_server.reset()
