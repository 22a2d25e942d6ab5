"""The embedded Redis `serve` starts keeps what it holds across a restart (issue 14's find)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import redis

from broker.runtime.embedded_redis import socket_answers, start_embedded_redis


def test_it_saves_to_disk_and_a_restart_finds_what_was_queued() -> None:
    with tempfile.TemporaryDirectory(prefix="kb-r-", dir="/tmp") as directory:
        data_dir = Path(directory)
        socket_path = data_dir / "redis.sock"
        server = start_embedded_redis(data_dir=data_dir, socket_path=socket_path)
        try:
            client = redis.Redis(unix_socket_path=str(socket_path))
            assert client.config_get("save") == {"save": "60 1"}
            client.rpush("celery", "a queued task")
            client.save()
        finally:
            server.terminate()
            server.wait(timeout=10)
        assert not socket_answers(socket_path)
        again = start_embedded_redis(data_dir=data_dir, socket_path=socket_path)
        try:
            client = redis.Redis(unix_socket_path=str(socket_path))
            assert client.lrange("celery", 0, -1) == [b"a queued task"]
        finally:
            again.terminate()
            again.wait(timeout=10)


def test_no_socket_is_no_answer(tmp_path: Path) -> None:
    assert socket_answers(tmp_path / "missing.sock") is False
