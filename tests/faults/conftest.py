"""The fault suite's fixtures: a private Redis to break, the chaos upstream and a web
process in front of it, and the figures each case reports for docs/reliability.md."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, free_port
from tests.faults.chaos import ChaosUpstream, chaos_in_thread, gzip_bomb
from tests.faults.figures import Figures
from tests.faults.processes import PrivateRedis, WebProcess, web_process
from tests.servers import process_env

RELIABILITY = REPO / "docs" / "reliability.md"


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """Each case's figures; written into docs/reliability.md's table at the end of the
    session when KEYBROKER_WRITE_RELIABILITY=1 (loads are timed, so the counts move a
    little from run to run: the file changes only when asked)."""
    collected = Figures()
    yield collected
    if os.environ.get("KEYBROKER_WRITE_RELIABILITY") == "1" and collected.rows:
        collected.write(RELIABILITY)


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
    assert upstream.failures == []


@pytest.fixture(scope="module")
def chaos_web(django_db_setup: None) -> Iterator[WebProcess]:
    """A keybroker web process for the chaos cases, on the test database and the suite's
    Redis; its idle timeout is 1 s, below the chaos upstream's silences."""
    with web_process(process_env(KEYBROKER_PROXY_IDLE_TIMEOUT="1")) as web:
        yield web
