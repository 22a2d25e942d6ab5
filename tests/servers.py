"""Other keybroker web processes beside the test: the uvicorn that `serve` starts, on a free
port, on the test's database and Redis, waited on until it answers."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from django.conf import settings
from django.db import connection

from broker.runtime.serve import uvicorn_command
from tests.conftest import REPO, clean_env, free_port
from tests.waiting import wait_until


def database_url() -> str:
    """The test database as another process reaches it."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    return f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def process_env(**overrides: str) -> dict[str, str]:
    """The environment of a keybroker process sharing this test's database and Redis."""
    return clean_env(
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        KEYBROKER_REDIS_PREFIX=settings.REDIS_KEY_PREFIX,
        KEYBROKER_DATA_DIR=str(settings.DATA_DIR),
        **overrides,
    )


@contextmanager
def uvicorn_serving(*, port: int, env: dict[str, str], timeout: float = 30) -> Iterator[str]:
    """Run `serve`'s uvicorn command on ``port``; yields its URL once /health answers.

    The command's proxy-header options follow this process's ``settings.TRUSTED_PROXIES``,
    as `serve`'s do. Fails the test with uvicorn's last words if it dies on the way up.
    """
    command = [
        *uvicorn_command(sys.executable, host="127.0.0.1", port=port, workers=1),
        "--log-level", "warning",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # A file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks it.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )

        def answers() -> bool:
            if process.poll() is not None:
                stderr.seek(0)
                pytest.fail(f"uvicorn on {port} died: {stderr.read().decode()[-2000:]}")
            try:
                httpx.get(f"{url}/health", timeout=1)
            except httpx.TransportError:
                return False
            return True

        try:
            wait_until(answers, timeout=timeout, what=f"uvicorn to answer on {url}", interval=0.1)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def second_process(live_url: str) -> Iterator[str]:
    """Another keybroker web process on the same database and Redis, as in production; its
    URL. Needs ``transactional_db``."""
    with uvicorn_serving(port=free_port(), env=process_env(KEYBROKER_PUBLIC_URL=live_url)) as url:
        yield url
