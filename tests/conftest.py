from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from broker.embedded_redis import start_embedded_redis
from broker.redis import redis_client

REPO = Path(__file__).resolve().parent.parent


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
    env.update(overrides)
    return env
