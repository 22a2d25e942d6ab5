"""`manage.py serve`: the whole broker in one command (Redis, uvicorn, Celery worker + beat)."""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

from broker.project.env import env_int
from broker.runtime.embedded_redis import EmbeddedRedisError, start_embedded_redis
from broker.runtime.supervisor import Supervisor, child_popen_options


def _port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"port {port} on {host} is already in use; stop what is using it or set "
                    "KEYBROKER_PORT"
                ) from None
            raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _database_ready() -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        connection.ensure_connection()
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CommandError(
            f"cannot use the database ({type(exc).__name__}: {first_line})"
        ) from None
    if plan:
        raise CommandError(
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
    ]  # fmt: skip


class Command(BaseCommand):
    help = (
        "Run keybroker: Redis (embedded unless REDIS_URL is set), uvicorn, and a Celery "
        "worker with beat."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--workers", type=int, default=1, help="uvicorn worker processes (default 1)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = settings.HOST, settings.PORT
        _port_free(host, port)
        _database_ready()

        supervisor = Supervisor(log=lambda line: self.stderr.write(f"keybroker: {line}"))
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
            else:
                from broker.runtime.health import check_redis

                if not check_redis().ok:
                    raise CommandError("cannot reach Redis at REDIS_URL")

            python = sys.executable
            concurrency = env_int("KEYBROKER_WORKER_CONCURRENCY", default=2, minimum=1)
            supervisor.spawn(
                "celery",
                [
                    python, "-m", "celery", "-A", "broker", "--quiet", "worker", "--beat",
                    "--concurrency", str(concurrency), "--loglevel", "INFO",
                    "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME,
                    "--hostname", f"keybroker@{socket.gethostname()}",
                    "--without-mingle", "--without-gossip",
                ],
            )  # fmt: skip
            supervisor.spawn(
                "uvicorn",
                uvicorn_command(python, host=host, port=port, workers=options["workers"]),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except (EmbeddedRedisError, CommandError) as exc:
            supervisor.stop_all()
            raise CommandError(str(exc)) from None

        code = supervisor.wait(until=lambda: _port_answers(host, port))
        if code == -1:
            url = settings.PUBLIC_URL
            self.stdout.write(
                f"keybroker {settings.VERSION} is up at {url}\n"
                f"  admin:     {url}/admin/\n"
                f"  API docs:  {url}/api/docs/\n"
                "Press Ctrl-C to stop."
            )
            self.stdout.flush()
            code = supervisor.wait()
        if code:
            raise CommandError("stopped because a component failed (see above)")
