"""What the web process' ASGI lifespan does at startup, run in a process of its own as
uvicorn runs it (the freeze it ends with would otherwise apply to the test process)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from broker.project.asgi import GIL_SWITCH_SECONDS
from tests.conftest import REPO
from tests.servers import process_env

pytestmark = pytest.mark.django_db(transaction=True)

# The lifespan's startup and shutdown, driven as uvicorn drives them; prints what it saw.
LIFESPAN = """
import asyncio, gc, json, sys
from broker.asgi import application

async def main():
    before = gc.get_freeze_count()
    urlconf_before = "broker.project.urls" in sys.modules
    events = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        events.put_nowait({"type": kind})
    sent = []

    async def send(message):
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            print(json.dumps({
                "urlconf_before": urlconf_before,
                "urlconf_after": "broker.project.urls" in sys.modules,
                "frozen_before": before,
                "frozen_after": gc.get_freeze_count(),
                "switch_interval": sys.getswitchinterval(),
            }))

    await application({"type": "lifespan"}, events.get, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"], sent

asyncio.run(main())
"""


def lifespan_started() -> dict[str, Any]:
    """What LIFESPAN printed once startup was complete."""
    done = subprocess.run(
        [sys.executable, "-c", LIFESPAN],
        cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    seen: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return seen


def test_startup_loads_the_urlconf_and_freezes_what_it_loaded() -> None:
    """A full collection walked Django's ~150k startup objects and stalled every open call
    ~100 ms under load; frozen, they are out of its sight (docs/decisions.md, issue 13)."""
    seen = lifespan_started()
    assert (seen["urlconf_before"], seen["urlconf_after"]) == (False, True)
    assert seen["frozen_before"] == 0
    # Most of what the process holds: Django, the apps, the URLconf and what it imports.
    assert seen["frozen_after"] > 50_000


def test_startup_shortens_the_gil_switch_interval() -> None:
    """The audit writer's thread held the GIL for up to Python's 5 ms at a time during each
    batch, and every call in flight waited (docs/decisions.md, issue 13)."""
    assert lifespan_started()["switch_interval"] == GIL_SWITCH_SECONDS < 0.005
