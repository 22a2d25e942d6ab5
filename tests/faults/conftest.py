"""The fault suite's fixtures: a private Redis to break, and the figures each case reports
for docs/reliability.md."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import REPO, free_port
from tests.faults.chaos import ChaosUpstream, chaos_in_thread, gzip_bomb
from tests.faults.processes import PrivateRedis, WebProcess, web_process
from tests.servers import process_env

RELIABILITY = REPO / "docs" / "reliability.md"
TABLE_START = "<!-- figures: written by tests/faults (KEYBROKER_WRITE_RELIABILITY=1) -->"
TABLE_END = "<!-- end of figures -->"


@dataclass(frozen=True)
class Figure:
    case: str
    load: str
    faults: str
    refused: str
    lost: int
    holds: str


class Figures:
    """What each case did and saw, in the order the cases ran."""

    def __init__(self) -> None:
        self.rows: dict[str, Figure] = {}

    def add(self, figure: Figure) -> None:
        self.rows[figure.case] = figure

    def table(self) -> str:
        lines = [
            "| Case | Load | Faults injected | Calls refused | Events lost | What holds |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {f.case} | {f.load} | {f.faults} | {f.refused} | {f.lost} | {f.holds} |"
            for f in self.rows.values()
        ]
        return "\n".join(lines)


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """Each case's figures; written into docs/reliability.md's table at the end of the
    session when KEYBROKER_WRITE_RELIABILITY=1 (loads are timed, so the counts move a
    little from run to run: the file changes only when asked)."""
    collected = Figures()
    yield collected
    if os.environ.get("KEYBROKER_WRITE_RELIABILITY") != "1" or not collected.rows:
        return
    text = RELIABILITY.read_text()
    table = f"{TABLE_START}\n{collected.table()}\n{TABLE_END}"
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    RELIABILITY.write_text(pattern.sub(lambda _: table, text))


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A running redis-server of this test's own; thawed and stopped afterwards whatever the
    test did to it."""
    redis = PrivateRedis()
    redis.start()
    try:
        yield redis
    finally:
        redis.close()


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosUpstream]:
    """The misbehaving upstream, one per module."""
    gzip_bomb()  # made now: made when asked, it would keep the upstream silent a while
    upstream = chaos_in_thread(free_port())
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def chaos_web(django_db_setup: None) -> Iterator[WebProcess]:
    """A keybroker web process for the chaos cases, on the test database and the suite's
    Redis; its idle timeout is 1 s, below the chaos upstream's silences."""
    with web_process(process_env(KEYBROKER_PROXY_IDLE_TIMEOUT="1")) as web:
        yield web
