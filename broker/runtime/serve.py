"""Running the whole broker on one machine: the embedded Redis (unless REDIS_URL is set),
uvicorn and a Celery worker with beat, under one supervisor (``manage.py serve``)."""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

from broker.infra.metrics import MULTIPROC_DIRNAME, MULTIPROC_ENV, metrics_dir_reset
from broker.runtime.embedded_redis import EmbeddedRedisError, start_embedded_redis
from broker.runtime.health import check_redis
from broker.runtime.supervisor import Supervisor, child_popen_options
from broker.runtime.where import where


class ServeError(Exception):
    """Why the broker cannot start, or why it stopped, in one line."""


def port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"port {port} on {host} is already in use; stop what is using it or set "
                    "KEYBROKER_PORT"
                ) from None
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def database_ready() -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        connection.ensure_connection()
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ServeError(f"cannot use the database ({type(exc).__name__}: {first_line})") from None
    if plan:
        raise ServeError(
            f"the database lacks {len(plan)} migration(s); run `python manage.py migrate` first"
        )


def proxy_header_options() -> list[str]:
    """uvicorn's forwarded-header options from KEYBROKER_TRUSTED_PROXIES (issue 19, item 10).

    uvicorn's own default believes X-Forwarded-For and X-Forwarded-Proto from 127.0.0.1 (or
    $FORWARDED_ALLOW_IPS); `serve` listens on loopback, so any local client could forge the
    address that enrollment limits, auth throttles and the audit use. Empty: no proxy
    headers at all; set: only from the listed addresses.
    """
    if not settings.TRUSTED_PROXIES:
        return ["--no-proxy-headers"]
    return ["--proxy-headers", f"--forwarded-allow-ips={','.join(settings.TRUSTED_PROXIES)}"]


def celery_command(python: str, *, concurrency: int) -> list[str]:
    """The Celery worker with beat that `serve` starts."""
    return [
        python, "-m", "celery", "-A", "broker", "--quiet", "worker", "--beat",
        "--concurrency", str(concurrency), "--loglevel", "INFO",
        "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME,
        "--hostname", f"keybroker@{socket.gethostname()}",
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def uvicorn_command(python: str, *, host: str, port: int, workers: int) -> list[str]:
    """The web process `serve` starts (tests start the same one)."""
    return [
        python, "-m", "uvicorn", "broker.asgi:application",
        "--host", host, "--port", str(port),
        "--workers", str(workers),
        "--lifespan", "on", "--no-server-header",
        *proxy_header_options(),
        # Closes connections whose request headers never finish (issue 19, 14).
        "--http", "broker.runtime.http_timeouts:HeaderTimeoutProtocol",
        "--timeout-graceful-shutdown", "10",
        "--timeout-keep-alive", str(settings.KEEP_ALIVE_SECONDS),
    ]  # fmt: skip


def metrics_env() -> dict[str, str]:
    """The children's environment, with the directory where every web and worker process
    keeps its metrics for /metrics to add up (the operator's PROMETHEUS_MULTIPROC_DIR, else
    one in the data dir), emptied of the last run's files."""
    directory = Path(os.environ.get(MULTIPROC_ENV) or settings.DATA_DIR / MULTIPROC_DIRNAME)
    metrics_dir_reset(directory)
    return {**os.environ, MULTIPROC_ENV: str(directory)}


def serve(
    *,
    workers: int,
    say: Callable[[str], None],
    log: Callable[[str], None],
    when_up: Callable[[], None] | None = None,
) -> None:
    """Start every component, tell ``say`` where the broker is once it answers (then call
    ``when_up``), and return when Ctrl-C stops them all; ServeError when one cannot start
    or fails."""
    host, port = settings.HOST, settings.PORT
    port_free(host, port)
    database_ready()
    log(where())

    supervisor = Supervisor(log=log)
    supervisor.install_signal_handlers()
    try:
        if settings.REDIS_EMBEDDED:
            # Redis's own chatter goes to a file; its failures still stop `serve`.
            redis_log = (settings.DATA_DIR / "redis.log").open("ab")
            redis_process = start_embedded_redis(
                data_dir=settings.DATA_DIR,
                socket_path=settings.REDIS_SOCKET,
                stdout=redis_log,
                stderr=redis_log,
                **child_popen_options(),
            )
            supervisor.adopt("redis", redis_process)
        elif not check_redis().ok:
            raise ServeError("cannot reach Redis at REDIS_URL")

        python = sys.executable
        env = metrics_env()
        supervisor.spawn(
            "celery",
            celery_command(python, concurrency=settings.WORKER_CONCURRENCY),
            env=env,
            # Background work waits for the proxy on a machine it shares (issue 13): a rollup
            # or a sweep must not take a core from calls in flight.
            niceness=settings.WORKER_NICENESS,
        )
        supervisor.spawn(
            "uvicorn",
            uvicorn_command(python, host=host, port=port, workers=workers),
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
    except (EmbeddedRedisError, ServeError) as exc:
        supervisor.stop_all()
        raise ServeError(str(exc)) from None

    code = supervisor.wait(until=lambda: port_answers(host, port))
    if code == -1:
        url = settings.PUBLIC_URL
        say(
            f"keybroker {settings.VERSION} is up at {url}\n"
            f"  admin:     {url}/admin/\n"
            f"  API docs:  {url}/api/docs/\n"
            "Press Ctrl-C to stop."
        )
        if when_up is not None:
            when_up()
        code = supervisor.wait()
    if code:
        raise ServeError("stopped because a component failed (see above)")
