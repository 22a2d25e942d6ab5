"""Real processes for the fault suite: keybroker's web process as `serve` starts it, and a
private Redis of the same binary `serve` embeds, which a case may stop, freeze and restart
without touching the Redis or PostgreSQL other test runs share."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.runtime.embedded_redis import redis_server_executable, socket_answers
from tests.conftest import REPO, free_port
from tests.servers import uvicorn_started
from tests.waiting import wait_until


@dataclass
class WebProcess:
    """A keybroker web process: its URL, and what /proc says of its memory and sockets."""

    url: str
    process: subprocess.Popen[bytes]

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.process.pid}/status")

    def peak_rss(self) -> int:
        """The most memory it ever held resident, in bytes (VmHWM: no sampling misses it)."""
        return self._status("VmHWM")

    def connections(self) -> list[tuple[int, int]]:
        """Its TCP connections, as (local port, remote port); listening sockets left out."""
        inodes = set()
        for fd in Path(f"/proc/{self.process.pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        found = []
        for table in ("tcp", "tcp6"):
            lines = Path(f"/proc/{self.process.pid}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                _, local, remote, state, *rest = line.split()
                if rest[5] in inodes and state != "0A":  # 0A: LISTEN
                    found.append((int(local.rsplit(":")[1], 16), int(remote.rsplit(":")[1], 16)))
        return found


@contextmanager
def web_process(
    env: dict[str, str],
    *,
    timeout: float = 30,
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
) -> Iterator[WebProcess]:
    """`serve`'s uvicorn command on a free port, once /health answers; on ``host``, and
    behind ``prefix`` (`ip netns exec NAME`: on another host's network), when given."""
    with uvicorn_started(port=free_port(), env=env, timeout=timeout, host=host, prefix=prefix) as (
        url,
        process,
    ):
        yield WebProcess(url=url, process=process)


def manage(env: dict[str, str], *args: str) -> str:
    """`manage.py` with these arguments in ``env`` (another database than the test's); its
    output. Fails the test with the command's last words when it fails."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode:
        pytest.fail(f"manage.py {args[0]} failed: {done.stderr[-2000:]}")
    return done.stdout


class PrivateRedis:
    """A redis-server of this test's own on a unix socket: the binary `serve` embeds, keeping
    no keys across a restart (as the embedded one does: see docs/reliability.md). With
    ``tcp_host``, also on TCP there, on a free port, for processes on other hosts."""

    def __init__(self, *, tcp_host: str | None = None) -> None:
        # Short: a unix socket path has at most 107 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="kbf-", dir="/tmp"))
        self.socket = self.directory / "redis.sock"
        self.tcp_host = tcp_host
        self.port = free_port() if tcp_host else 0
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_url(self) -> str:
        assert self.tcp_host is not None, "a PrivateRedis made without tcp_host"
        return f"redis://{self.tcp_host}:{self.port}/0"

    def start(self) -> None:
        tcp = ["--bind", self.tcp_host] if self.tcp_host else []
        command = [
            redis_server_executable(),
            "--port", str(self.port), *tcp,
            "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(
            lambda: socket_answers(self.socket), timeout=10, what=f"redis-server on {self.socket}"
        )

    def stop(self) -> None:
        """Down: the process ends; connecting is refused until start()."""
        assert self.process is not None
        self.thaw()
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def freeze(self) -> None:
        """Frozen: the process and its sockets stay, but it answers nothing."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.process is not None and self.frozen:
            os.kill(self.process.pid, signal.SIGCONT)
            self.frozen = False

    def cut(self) -> None:
        """Unreachable for new connections (the socket moved away), as behind a network
        partition: its keys stay, and connections already open still work."""
        self.socket.rename(self.socket.with_suffix(".away"))

    def heal(self) -> None:
        self.socket.with_suffix(".away").rename(self.socket)

    def close(self) -> None:
        if self.process is not None:
            self.stop()
        for path in self.directory.iterdir():
            path.unlink()
        self.directory.rmdir()


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own (initdb in a temporary directory, on a free
    port), run as the ``postgres`` user when this process is root, as PostgreSQL requires.
    Raises pytest's skip with the reason when one cannot be made here.

    With ``also_on`` (an address of this machine) and ``clients`` (a network, CIDR), it
    also listens there and lets that network in, for processes on other hosts."""

    def __init__(self, *, also_on: str | None = None, clients: str | None = None) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(
                f"no PostgreSQL server binaries in {PG_BIN}: the PostgreSQL case needs them"
            )
        self.directory = Path(tempfile.mkdtemp(prefix="kbf-pg-", dir="/tmp"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.listen = ",".join(["127.0.0.1", *([also_on] if also_on else [])])
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                pytest.skip("running as root without runuser: cannot run initdb as postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.directory, "postgres")
        made = self._run(PG_BIN / "initdb", "-D", self.data, "-U", "keybroker", "-A", "trust",
                         "--no-sync")  # fmt: skip
        if made.returncode:
            self.close()
            pytest.skip(f"initdb could not make a private cluster: {made.stdout[-300:]!r}")
        if clients:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {clients} trust\n")
        self.start()
        self._run(PG_BIN / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "keybroker",
                  "keybroker", check=True)  # fmt: skip

    @property
    def url(self) -> str:
        return self.url_on("127.0.0.1")

    def url_on(self, address: str) -> str:
        return f"postgres://keybroker@{address}:{self.port}/keybroker"

    def _run(self, *command: object, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, *map(str, command)],
            # The cluster's own directory: the postgres user may not enter the checkout's
            # (a clone in a 0700 mktemp directory), and psql says so on the output it returns.
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=check,
            timeout=60,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses={self.listen} -c fsync=off"
        )
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-o", options, "-l",
                  self.directory / "log", "-w", "start", check=True)  # fmt: skip

    def stop(self) -> None:
        """Down, as a restart takes it down: every connection is closed."""
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=True)

    def query(self, sql: str) -> str:
        return self._run("psql", "-h", "127.0.0.1", "-p", self.port, "-U", "keybroker",
                         "-tAc", sql, "keybroker", check=True).stdout.strip()  # fmt: skip

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)
