"""A small supervisor for `manage.py serve`: start children, watch them, stop them in order.

Rules: any child that exits on its own is reported and takes the whole broker down with a
non-zero code (a half-running broker is worse than a stopped one); SIGINT or SIGTERM stop
every child, web server first and Redis last, so in-flight work can finish.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when `serve` dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_popen_options(*, niceness: int = 0) -> dict[str, Any]:
    """How `serve` starts a child: ``niceness`` above 0 gives it a lower CPU priority."""

    def prepare() -> None:
        _die_with_parent()
        if niceness:
            os.nice(niceness)

    # A session of their own keeps the terminal's Ctrl-C away from the children, so the
    # supervisor alone decides the order in which they stop.
    return {"start_new_session": True, "preexec_fn": prepare}


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    stop_timeout: float = 20.0


@dataclass
class Supervisor:
    log: Callable[[str], None]
    children: list[Child] = field(default_factory=list)
    _stop_requested: int | None = None

    def spawn(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        niceness: int = 0,
    ) -> Child:
        process = subprocess.Popen(command, env=env, **child_popen_options(niceness=niceness))
        return self.adopt(name, process)

    def adopt(self, name: str, process: subprocess.Popen[bytes]) -> Child:
        child = Child(name, process)
        self.children.append(child)
        self.log(f"started {name} (pid {process.pid})")
        return child

    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            self._stop_requested = signum

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def wait(self, *, until: Callable[[], bool] | None = None, poll_interval: float = 0.2) -> int:
        """Watch the children until a stop signal (returns 0), a child's exit (returns 1) or
        ``until()`` turns true (returns -1 and leaves the children running)."""
        while True:
            if self._stop_requested is not None:
                self.log(f"received {signal.Signals(self._stop_requested).name}; stopping")
                self.stop_all()
                return 0
            exited = self.first_exited()
            if exited is not None:
                self.log(
                    f"{exited.name} exited unexpectedly with code {exited.process.returncode}; "
                    "stopping keybroker"
                )
                self.stop_all()
                return 1
            if until is not None and until():
                return -1
            time.sleep(poll_interval)

    def stop_all(self) -> None:
        # Reverse start order: the web server stops taking requests first, Redis goes last.
        for child in reversed(self.children):
            self._stop(child)

    def _stop(self, child: Child) -> None:
        if child.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        try:
            child.process.wait(timeout=child.stop_timeout)
        except subprocess.TimeoutExpired:
            self.log(f"{child.name} did not stop within {child.stop_timeout:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
