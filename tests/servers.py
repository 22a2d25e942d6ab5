"""keybroker's web servers beside the test: the live server in this process, and other
processes running the uvicorn that `serve` starts, on the test's database and Redis."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, NoReturn

import httpx
import pytest
from django.conf import settings
from django.db import connection

from audit.recorder import audit_backlog
from broker.infra.redis import redis_client, redis_key
from broker.runtime.serve import uvicorn_command
from tests.conftest import REPO, clean_env, free_port
from tests.fake_anthropic import Receive, Scope, Send, serve_in_thread
from tests.waiting import wait_until


class LiveServer:
    """An ASGI app as the live server runs it, counting the HTTP calls it is inside."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.loop = asyncio.get_running_loop()
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.calls += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.calls -= 1

    def settled(self) -> bool:
        """No call in progress, and no audit event queued or being written.

        Read on the server's own event loop: from another thread the recorder could be seen
        between taking a batch off its queue and counting it as being written.
        """

        async def look() -> bool:
            return self.calls == 0 and audit_backlog() == 0

        if self.loop is None:
            return audit_backlog() == 0
        return asyncio.run_coroutine_threadsafe(look(), self.loop).result(timeout=5)


_live: list[LiveServer] = []  # the session's live server, once a test asked for it


def live_server_settled() -> bool:
    """The live server (if one runs) has finished every call and written every audit event
    they queued; without one, nothing is queued in this process."""
    if not _live:
        return audit_backlog() == 0
    return _live[0].settled()


@pytest.fixture(scope="session")
def live_url() -> Iterator[str]:
    """broker.asgi:application behind a real uvicorn on a real socket, in this process.

    Tests that use it need ``transactional_db`` so the server thread sees their rows.
    """
    from broker.asgi import application

    live = LiveServer(application)
    port = free_port()
    # With its lifespan, as in production: shutdown drains the audit queue and closes the
    # upstream connection pool. Idle connections are kept as `serve` keeps them.
    server = serve_in_thread(live, port, lifespan="on", keep_alive=settings.KEEP_ALIVE_SECONDS)
    _live.append(live)
    yield f"http://127.0.0.1:{port}"
    _live.clear()
    server.should_exit = True
    server.thread.join(timeout=15)  # type: ignore[attr-defined]


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


# `serve` gives open calls 10 s to finish (--timeout-graceful-shutdown) before the lifespan
# drains the audit queue: a process still up well after that is stuck.
STOP_SECONDS = 25


@contextmanager
def uvicorn_started(
    *,
    port: int,
    env: dict[str, str],
    timeout: float = 30,
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
    log_level: str = "info",
    stdout: IO[bytes] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `serve`'s uvicorn command on ``host``:``port``; yields its URL and process once
    /health answers. ``prefix`` goes before the command (``ip netns exec NAME`` runs it on
    another host's network: tests/faults/netns.py). uvicorn's stdout (its access log)
    goes to ``stdout``, or nowhere; at ``log_level`` info its stderr says which phase of
    stopping it is in, should it not stop.

    The command's proxy-header options follow this process's ``settings.TRUSTED_PROXIES``,
    as `serve`'s do. Fails the test with uvicorn's last words if it dies on the way up.
    """
    command = [
        *prefix,
        *uvicorn_command(sys.executable, host=host, port=port, workers=1),
        "--log-level", log_level,
    ]  # fmt: skip
    url = f"http://{host}:{port}"
    # A file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks it.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            # Its threads' tracebacks on SIGABRT: what it was doing if it will not stop.
            env={**env, "PYTHONFAULTHANDLER": "1"},
            stdout=stdout or subprocess.DEVNULL,
            stderr=stderr,
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
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGABRT)
                process.wait(timeout=15)
                stderr.seek(0)
                _did_not_stop(port, stderr.read().decode(errors="replace"))


def _did_not_stop(port: int, stderr: str) -> NoReturn:
    """Fail with what uvicorn last logged before the abort (the phase of its shutdown it
    was in) on one short line, so that CI's tail names the test and the phase; the whole
    log and every thread's stack go to this test's captured stderr."""
    sys.stderr.write(f"uvicorn on {port}, its stderr to the abort:\n{stderr}\n")
    logged, _, _ = stderr.partition("Fatal Python error")
    lines = [line for line in logged.splitlines() if line.strip()]
    last = lines[-1] if lines else "nothing"
    pytest.fail(f"uvicorn on {port} did not stop in {STOP_SECONDS} s; it last logged: {last}")


@contextmanager
def uvicorn_serving(*, port: int, env: dict[str, str], timeout: float = 30) -> Iterator[str]:
    """``uvicorn_started``'s URL alone."""
    with uvicorn_started(port=port, env=env, timeout=timeout) as (url, _):
        yield url


@pytest.fixture
def second_process(live_url: str) -> Iterator[str]:
    """Another keybroker web process on the same database and Redis, as in production; its
    URL. Needs ``transactional_db``."""
    with uvicorn_serving(port=free_port(), env=process_env(KEYBROKER_PUBLIC_URL=live_url)) as url:
        yield url


@contextmanager
def celery_worker_running(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process with ``env`` (``process_env``: the test's database and
    Redis), as in production, once it is ready."""
    heartbeat = redis_key("worker", "heartbeat")
    redis_client().delete(heartbeat)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "broker", "worker", "--pool", "solo",
         "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip

    def ready() -> bool:  # the worker writes its heartbeat when it is ready
        return worker.poll() is not None or bool(redis_client().exists(heartbeat))

    try:
        wait_until(ready, timeout=60, what="the Celery worker's first heartbeat", interval=0.1)
        if worker.poll() is not None:
            pytest.fail(f"the worker died: {worker.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        yield worker
    finally:
        worker.terminate()
        worker.wait(timeout=20)


@pytest.fixture
def celery_worker() -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process on the test database and Redis."""
    with celery_worker_running(process_env()) as worker:
        yield worker
