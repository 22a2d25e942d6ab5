"""`serve` starts one uvicorn worker per core unless told otherwise (issue 13)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.core.management import call_command
from django.test import override_settings

from broker.runtime import serve as runtime


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The worker counts `manage.py serve` asked the runtime for, nothing started."""
    asked: list[int] = []

    def serve(*, workers: int, **_: Any) -> None:
        asked.append(workers)

    monkeypatch.setattr("broker.management.commands.serve.serve", serve)
    return asked


def test_the_default_is_one_worker_per_core(started: list[int]) -> None:
    from django.conf import settings

    assert (os.cpu_count() or 1) == settings.WEB_WORKERS
    call_command("serve")
    assert started == [settings.WEB_WORKERS]


@override_settings(WEB_WORKERS=3)
def test_keybroker_web_workers_sets_it_and_the_flag_overrides_it(started: list[int]) -> None:
    call_command("serve")
    call_command("serve", "--workers", "1")
    assert started == [3, 1]


def test_uvicorn_gets_the_count() -> None:
    command = runtime.uvicorn_command("python", host="127.0.0.1", port=8400, workers=2)
    assert command[command.index("--workers") + 1] == "2"
