"""Two hosts on one machine: network namespaces, each with its own network stack, joined
to the root namespace by veth pairs on a bridge in a private /24 (10.213.N.0/24).

The root namespace is the network's services side (PostgreSQL, Redis, the upstream listen
on the bridge's address, ``.1``); the hosts are ``.2`` and ``.3``. Nothing is routed
anywhere else: the addresses exist only on this machine.

Every name carries this process's pid (``kbf-a-<pid>``, ``kbfbr<pid>``), so a run can tell
what a run that was killed left behind (its pid is gone) and remove it, with the processes
still running there or listening on its bridge (a killed run's private PostgreSQL and
Redis), and runs at the same time do not collide.
"""

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.waiting import wait_until

SUBNETS = "10.213"
STALE_NAMESPACE = re.compile(r"^kbf-[ab]-(\d+)$")
STALE_LINK = re.compile(r"^kbf(?:br|a|b)(\d+)$")


class CannotMake(Exception):
    """This machine will not make the namespaces or links (no root, no `ip`, a kernel or
    container that refuses)."""


@dataclass(frozen=True)
class Host:
    """One host: a network namespace with one address on the bridge."""

    namespace: str
    address: str

    @property
    def prefix(self) -> list[str]:
        """What runs a command on this host's network."""
        return ["ip", "netns", "exec", self.namespace]


@dataclass(frozen=True)
class Network:
    bridge: str
    gateway: str  # the root namespace's address on the bridge: the services side
    subnet: str  # CIDR
    hosts: tuple[Host, Host]


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise CannotMake(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_namespace(name: str) -> None:
    """Kill what still runs in it (a namespace outlives its name while processes hold it),
    then delete it, which deletes its end of the veth pair and with it the pair."""
    with contextlib.suppress(CannotMake):
        for pid in _ip("netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(CannotMake):
        _ip("netns", "delete", name)


def _remove_link(name: str) -> None:
    with contextlib.suppress(CannotMake):
        _ip("link", "delete", name)


def _listening_on(address: str) -> set[int]:
    """The processes of the root namespace with a TCP socket listening on ``address``."""
    # /proc/net/tcp prints an IPv4 address as the hex of the 32-bit word in memory.
    wanted = f"{int.from_bytes(socket.inet_aton(address), sys.byteorder):08X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, _, state, *rest = line.split()
        if state == "0A" and local.split(":")[0] == wanted:  # 0A: LISTEN
            inodes.add(f"socket:[{rest[5]}]")
    pids = set()
    for process in Path("/proc").iterdir():
        if process.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (process / "fd").iterdir()):
                    pids.add(int(process.name))
    return pids


def _stop(pid: int) -> None:
    """SIGTERM, and wait for it to end; then remove its temporary directory (the ones
    tests/faults/processes.py makes are named kbf-… in the temporary directory)."""
    with contextlib.suppress(OSError):
        directory = Path(os.readlink(f"/proc/{pid}/cwd"))
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), timeout=15, what=f"stale process {pid} to stop")
        for made in (directory, *directory.parents):
            if made.parent == Path(tempfile.gettempdir()) and made.name.startswith("kbf-"):
                shutil.rmtree(made, ignore_errors=True)


def _stop_listeners(bridge: str) -> None:
    """Stop what listens on a stale bridge's address: the private PostgreSQL and Redis of
    the run that made it."""
    with contextlib.suppress(CannotMake):
        for line in _ip("-o", "-4", "addr", "show", "dev", bridge).splitlines():
            for pid in _listening_on(line.split()[3].split("/")[0]):
                _stop(pid)


def remove_stale() -> None:
    """Namespaces, links and processes that a run which is no longer alive left behind."""
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        found = STALE_NAMESPACE.match(name)
        if found and not _alive(int(found[1])):
            _remove_namespace(name)
    for line in _ip("-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        found = STALE_LINK.match(name)
        if found and not _alive(int(found[1])):
            if name.startswith("kbfbr"):
                _stop_listeners(name)
            _remove_link(name)


def _free_subnet() -> str:
    """10.213.N, for an N that no address of the root namespace is in."""
    used = _ip("-o", "-4", "addr", "show")
    start = os.getpid() % 254
    for offset in range(254):
        candidate = f"{SUBNETS}.{(start + offset) % 254 + 1}"
        if f" {candidate}." not in used:
            return candidate
    raise CannotMake(f"every {SUBNETS}.N.0/24 is in use")


def _make(pid: int) -> Network:
    base = _free_subnet()
    bridge = f"kbfbr{pid}"
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"{base}.1/24", "dev", bridge)
    _ip("link", "set", bridge, "up")
    hosts = []
    for number, letter in enumerate("ab", start=2):
        namespace = f"kbf-{letter}-{pid}"
        outside = f"kbf{letter}{pid}"
        _ip("netns", "add", namespace)
        _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("link", "set", outside, "master", bridge, "up")
        _ip("-n", namespace, "addr", "add", f"{base}.{number}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        hosts.append(Host(namespace=namespace, address=f"{base}.{number}"))
    return Network(
        bridge=bridge, gateway=f"{base}.1", subnet=f"{base}.0/24", hosts=(hosts[0], hosts[1])
    )


def _remove(pid: int) -> None:
    for letter in "ab":
        _remove_namespace(f"kbf-{letter}-{pid}")
        _remove_link(f"kbf{letter}{pid}")  # gone with the namespace, unless that failed
    _remove_link(f"kbfbr{pid}")


@contextmanager
def two_hosts() -> Iterator[Network]:
    """Two hosts and the bridge between them and the root namespace; removed afterwards,
    whatever happened. Raises pytest's skip, saying why, where they cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("two hosts need network namespaces, which only root can make")
    if shutil.which("ip") is None:
        pytest.skip("two hosts need network namespaces: no `ip` command (iproute2) here")
    pid = os.getpid()
    try:
        remove_stale()
        _remove(pid)  # this pid's, from a run killed before this one reused it
        network = _make(pid)
    except CannotMake as exc:
        _remove(pid)
        pytest.skip(f"cannot make network namespaces here: {exc}")
    try:
        yield network
    finally:
        _remove(pid)
