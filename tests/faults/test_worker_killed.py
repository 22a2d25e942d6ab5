"""The Celery worker killed (SIGKILL) in the middle of its work: the next run finishes it,
and nothing is done twice. A token sweep claims each expiry by a conditional update, its
audit event in the same transaction; a validation records a key's result only once it has
it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from audit.models import AuditEvent
from broker.models import BackendKey, Token, ValidationState
from broker.runtime.serve import celery_command
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add, backend_validate
from broker.services.tokens import token_issue, tokens_sweep
from broker.tasks import tokens_sweep_task
from tests.conftest import REPO
from tests.fake_anthropic import FakeAnthropic
from tests.faults.figures import Figure, Figures
from tests.keys import api_key
from tests.servers import process_env
from tests.waiting import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

TOKENS = 300
VALIDATION_ACTIONS = ["backend.validated", "backend.invalid", "backend.unreachable"]


def killed_when(condition: Callable[[], object], what: str) -> None:
    """Run `serve`'s Celery worker (with beat) on the test's database and Redis, and kill it
    with SIGKILL, its pool's children too, once ``condition`` holds."""
    with tempfile.TemporaryFile() as output:
        worker = subprocess.Popen(
            celery_command(sys.executable, concurrency=1),
            cwd=REPO, env=process_env(), stdout=output, stderr=output,
            start_new_session=True,
        )  # fmt: skip
        try:
            wait_until(condition, timeout=30, what=what)
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


def test_a_worker_killed_mid_sweep_leaves_the_rest_to_the_next_run_and_nothing_twice(
    fake_anthropic: FakeAnthropic, alice: AbstractBaseUser, figures: Figures
) -> None:
    backend_add(name="anthropic", secret=api_key(tail="Sw33"), base_url=fake_anthropic.url)
    agent = agent_enroll(name="sweeper", scopes=["anthropic"], approved_by=alice).agent
    for _ in range(TOKENS):
        token_issue(agent=agent, backend_name="anthropic", ttl="30m")
    Token.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    expired = AuditEvent.objects.filter(action="token.expired")

    tokens_sweep_task.delay()
    # Killed once it has recorded some expiries and before it recorded them all.
    killed_when(lambda: expired.count() >= 5, "the sweep to begin")
    done_by_the_killed = expired.count()
    assert done_by_the_killed < TOKENS

    result = tokens_sweep()  # the next run

    assert result.expired == TOKENS - done_by_the_killed
    assert not Token.objects.filter(expired_at__isnull=True).exists()
    assert expired.count() == TOKENS
    assert expired.values("token_id").distinct().count() == TOKENS
    figures.add(
        Figure(
            case="The Celery worker killed (SIGKILL) mid token sweep",
            load=f"{TOKENS} expired tokens",
            faults=f"worker killed after {done_by_the_killed} expiries",
            refused="-",
            lost=TOKENS - expired.count(),
            holds="the next run records the rest; each expiry recorded once",
        )
    )


def test_a_worker_killed_mid_validation_records_nothing_and_the_next_run_records_once(
    fake_anthropic: FakeAnthropic, figures: Figures
) -> None:
    key = api_key(tail="V4ld")
    fake_anthropic.valid_keys.add(key)
    fake_anthropic.hang_seconds = 10  # the upstream takes its time to answer the check
    backend = backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    keys = BackendKey.objects.filter(backend=backend)
    before = list(keys.values_list("validation_state", "validation_checked_at"))
    validations = AuditEvent.objects.filter(action__in=VALIDATION_ACTIONS)

    # backend_add queued the backend's validation: killed while its check is upstream.
    killed_when(lambda: fake_anthropic.requests, "the validation's check to reach the upstream")

    assert list(keys.values_list("validation_state", "validation_checked_at")) == before
    assert validations.count() == 0
    fake_anthropic.hang_seconds = 0
    backend_validate(backend=backend)  # the next run
    assert list(keys.values_list("validation_state", flat=True)) == [ValidationState.VALID]
    assert list(validations.values_list("action", flat=True)) == ["backend.validated"]
    figures.add(
        Figure(
            case="The Celery worker killed (SIGKILL) mid key validation",
            load="1 backend, 1 key",
            faults="worker killed while the upstream holds its check",
            refused="-",
            lost=0,
            holds="nothing recorded by the killed run; the next records the key valid, once",
        )
    )
