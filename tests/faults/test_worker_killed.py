"""The Celery worker killed (SIGKILL) in the middle of a token sweep: the next run finishes
the work, and nothing is done twice (each expiry is claimed by a conditional update, its
audit event in the same transaction)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from audit.models import AuditEvent
from broker.models import Token
from broker.runtime.serve import celery_command
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
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


def test_a_worker_killed_mid_sweep_leaves_the_rest_to_the_next_run_and_nothing_twice(
    fake_anthropic: FakeAnthropic, alice: AbstractBaseUser, figures: Figures
) -> None:
    backend_add(name="anthropic", secret=api_key(tail="Sw33"), base_url=fake_anthropic.url)
    agent = agent_enroll(name="sweeper", scopes=["anthropic"], approved_by=alice).agent
    for _ in range(TOKENS):
        token_issue(agent=agent, backend_name="anthropic", ttl="30m")
    Token.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    expired = AuditEvent.objects.filter(action="token.expired")

    with tempfile.TemporaryFile() as output:
        worker = subprocess.Popen(
            celery_command(sys.executable, concurrency=1),
            cwd=REPO, env=process_env(), stdout=output, stderr=output,
            start_new_session=True,  # its pool's children die with it
        )  # fmt: skip
        try:
            tokens_sweep_task.delay()
            # Killed once it has recorded some expiries and before it recorded them all.
            wait_until(lambda: expired.count() >= 5, timeout=30, what="the sweep to begin")
            os.killpg(worker.pid, signal.SIGKILL)
        finally:
            worker.wait(timeout=10)
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
