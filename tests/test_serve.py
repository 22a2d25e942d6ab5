"""`manage.py serve` as an operator runs it: real processes, embedded SQLite and Redis."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, clean_env, free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@dataclass
class Broker:
    data_dir: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", *args],
            cwd=REPO,
            env=self.env,
            stdout=(self.data_dir / "stdout").open("wb"),
            stderr=(self.data_dir / "stderr").open("wb"),
        )
        return self.process

    def output(self) -> str:
        return (self.data_dir / "stdout").read_text() + (self.data_dir / "stderr").read_text()

    def child_pids(self) -> dict[str, int]:
        return {m[0]: int(m[1]) for m in re.findall(r"started (\w+) \(pid (\d+)\)", self.output())}

    def wait_ready(self, timeout: float = 90) -> dict[str, object]:
        def ready() -> dict[str, object] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"serve exited early:\n{self.output()}")
            try:
                response = httpx.get(f"{self.url}/ready", timeout=2)
            except httpx.TransportError:
                return None
            return dict(response.json()) if response.status_code == 200 else None

        return wait_until(
            ready,
            timeout=timeout,
            what=lambda: f"serve to be ready:\n{self.output()}",
            interval=0.3,
        )

    def redis(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.data_dir / "redis.sock"))


@pytest.fixture
def broker() -> Iterator[Broker]:
    data_dir = Path(tempfile.mkdtemp(prefix="kbserve-"))
    port = free_port()
    env = clean_env(
        KEYBROKER_DATA_DIR=str(data_dir),
        KEYBROKER_PORT=str(port),
        KEYBROKER_WORKER_CONCURRENCY="1",
    )
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    instance = Broker(data_dir, port, env)
    yield instance
    if instance.process is not None and instance.process.poll() is None:
        instance.process.kill()
        instance.process.wait()
    for pid in instance.child_pids().values():
        # Each child leads a process group of its own (serve starts them in new sessions):
        # killing the group takes Celery's pool and beat processes too, which a kill of the
        # worker alone left running, orphaned, after the suite.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(data_dir, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_runs_redis_worker_and_web_and_stops_cleanly_on_sigterm(broker: Broker) -> None:
    process = broker.start()
    ready = broker.wait_ready()
    assert ready["checks"] == {
        "database": {"ok": True, "detail": "sqlite"},
        "redis": {"ok": True, "detail": "embedded"},
        "worker": ready["checks"]["worker"],  # type: ignore[index]
    }
    # serve says where it is once it saw the web process answer, which may be just after
    # this test did.
    wait_until(
        lambda: f"{broker.url}/api/docs/" in broker.output(),
        timeout=10,
        what="serve to print the broker's URLs",
    )
    assert f"{broker.url}/admin/" in broker.output()
    # Which database and Redis it uses, once (issue 20, item 8).
    assert broker.output().count("keybroker: database: ") == 1
    assert (
        f"keybroker: database: SQLite {broker.data_dir / 'keybroker.sqlite3'} (DATABASE_URL is "
        "not set); redis: the embedded one on"
    ) in broker.output()
    assert (broker.data_dir / "secret_key").stat().st_mode & 0o777 == 0o600

    # Beat schedules the heartbeat task through the embedded Redis and the worker runs it:
    # remove the last heartbeat and watch a new one arrive.
    heartbeat_key = "keybroker:worker:heartbeat"
    client = broker.redis()
    assert client.delete(heartbeat_key) == 1
    wait_until(
        lambda: client.get(heartbeat_key) is not None,
        timeout=30,
        what=lambda: f"a task to run:\n{broker.output()}",
        interval=0.5,
    )
    assert httpx.get(f"{broker.url}/ready").status_code == 200
    # Beat sent it and the worker ran it without a line at INFO (issue 20, item 5).
    assert "broker.tasks.heartbeat" not in broker.output()

    children = broker.child_pids()
    assert set(children) == {"redis", "celery", "uvicorn"}
    # The worker yields the CPU to the web process (issue 13): nice 10 against 0.
    assert os.getpriority(os.PRIO_PROCESS, children["celery"]) == 10
    assert os.getpriority(os.PRIO_PROCESS, children["uvicorn"]) == 0
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not [name for name, pid in children.items() if alive(pid)]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{broker.url}/health", timeout=2)


def test_make_runs_first_admin_password_is_the_last_thing_serve_prints(broker: Broker) -> None:
    """`make run` is `serve --ensure-admin`: the password comes after the URLs, framed, so
    the start-up lines do not scroll it away (issue 20, item 5)."""
    broker.start("--ensure-admin")
    stdout = broker.data_dir / "stdout"
    wait_until(
        lambda: "changepassword admin" in stdout.read_text(),
        timeout=90,
        what=lambda: f"serve to print the first admin's password:\n{broker.output()}",
        interval=0.3,
    )
    printed = stdout.read_text()
    assert printed.index(f"{broker.url}/api/docs/") < printed.index("The first admin")
    box = printed[printed.index("+--") :].splitlines()
    assert box[0] == box[5] == "+" + "-" * (len(box[1]) - 2) + "+"
    assert box[4].startswith("| top right), or run: .venv/bin/python manage.py changepassword")
    password = box[1].split("password ")[1].split()[0]
    assert f"Log in at {broker.url}/admin/ and change it there" in box[3]
    # The password works: alice's log-in form, as a person would use it.
    with httpx.Client(base_url=broker.url) as client:
        form = client.get("/admin/login/")
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert csrf is not None
        logged_in = client.post(
            "/admin/login/?next=/admin/",
            data={"username": "admin", "password": password, "csrfmiddlewaretoken": csrf[1]},
        )
        assert (logged_in.status_code, logged_in.headers["location"]) == (302, "/admin/")


def test_a_child_that_dies_is_reported_and_stops_everything(broker: Broker) -> None:
    process = broker.start()
    broker.wait_ready()
    children = broker.child_pids()
    os.kill(children["redis"], signal.SIGKILL)
    assert process.wait(timeout=60) != 0
    assert "redis exited unexpectedly" in broker.output()
    assert not [name for name, pid in children.items() if alive(pid)]


def test_a_taken_port_stops_serve_with_one_clear_line(broker: Broker) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker.port))
        squatter.listen()
        process = broker.start()
        assert process.wait(timeout=60) == 1
    lines = broker.output().strip().splitlines()
    assert lines == [
        f"CommandError: port {broker.port} on 127.0.0.1 is already in use; "
        "stop what is using it or set KEYBROKER_PORT"
    ]
    assert not (broker.data_dir / "redis.sock").exists()


@pytest.mark.parametrize(
    ("database_url", "expected"),
    [
        ("postgres://kb:hunter2@[::1:5432/kb", "DATABASE_URL is malformed"),
        ("mysql://kb:hunter2@db/kb", "DATABASE_URL must start with postgres:// or sqlite://"),
        ("postgres://kb:hunter2@127.0.0.1:1/kb", "cannot use the database (OperationalError"),
    ],
)
def test_a_bad_database_url_stops_serve_with_one_clear_line(
    broker: Broker, database_url: str, expected: str
) -> None:
    broker.env["DATABASE_URL"] = database_url
    process = broker.start()
    assert process.wait(timeout=60) == 1
    output = broker.output()
    assert len(output.strip().splitlines()) == 1, output
    assert expected in output
    assert "Traceback" not in output
    assert "hunter2" not in output


def test_serve_gives_web_and_worker_processes_one_metrics_directory(broker: Broker) -> None:
    """/metrics on any of serve's web workers counts the tasks its Celery worker ran."""
    stale = broker.data_dir / "metrics" / "counter_999999.db"
    stale.parent.mkdir()
    stale.write_bytes(b"a file from an earlier run")
    broker.env.update(KEYBROKER_WEB_WORKERS="2", KEYBROKER_METRICS_ALLOW="127.0.0.1")
    broker.start()
    broker.wait_ready()
    assert not stale.exists()

    def heartbeats_counted() -> float:
        response = httpx.get(f"{broker.url}/metrics", timeout=5)
        assert response.status_code == 200, response.text
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == "keybroker_celery_tasks_total" and sample.labels == {
                    "task": "broker.tasks.heartbeat",
                    "outcome": "success",
                }:
                    return sample.value
        return 0.0

    # Beat sends the heartbeat task every 10 s; the worker's count reaches the web workers.
    assert wait_until(heartbeats_counted, timeout=40, what="a heartbeat task counted", interval=1)
    assert list((broker.data_dir / "metrics").glob("counter_*.db"))
