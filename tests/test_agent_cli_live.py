"""The `keybroker` agent CLI as a subprocess against the real server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser

from broker.models import Agent, Backend, Token
from broker.services.agents import agent_approve
from tests.conftest import REPO, clean_env
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_enroll_wait_get_list_revoke_unenroll(
    live_url: str, anthropic: Backend, alice: AbstractBaseUser, tmp_path: Path, settings: Any
) -> None:
    settings.PUBLIC_URL = live_url  # the server runs in this process
    config = tmp_path / "xdg" / "keybroker" / "config.json"
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path))
    command = [sys.executable, "-m", "keybroker.cli"]

    def keybroker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
        )

    waiting = subprocess.Popen(
        [*command, "enroll", live_url, "--name", "bob", "--can", "anthropic", "--timeout", "1m",
         "--poll-interval", "0.2"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(
        Agent.objects.filter(name="bob").exists, timeout=20, what="the CLI to enroll", interval=0.1
    )
    time.sleep(0.5)  # a CLI that did not wait would have exited by now (two polls' time)
    assert waiting.poll() is None, "enroll must wait for the approval"
    agent_approve(agent=Agent.objects.get(name="bob"), by=alice)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert "waiting" in err
    assert config.stat().st_mode & 0o777 == 0o600
    vend_token = json.loads(config.read_text())["vend_token"]

    got = keybroker("get", "anthropic", "--ttl", "5m")
    assert got.returncode == 0, got.stderr
    token = got.stdout.strip()
    assert token.startswith("crd_")
    minted = Token.objects.get()
    assert minted.ttl_seconds == 300

    listed = keybroker("ls")
    assert str(minted.pk) in listed.stdout
    # The start of its id, as people copy it from `ls`, is enough.
    revoked = keybroker("revoke", str(minted.pk)[:8])
    assert revoked.stdout == f"revoked {minted.pk}\n", revoked.stderr
    assert Token.objects.get().revoked_at is not None

    exported = keybroker("env", "anthropic")
    assert f"ANTHROPIC_BASE_URL={live_url}/v1/proxy/anthropic" in exported.stdout.replace("'", "")

    assert keybroker("unenroll").returncode == 0
    assert Agent.objects.get(name="bob").status == "unenrolled"
    assert Token.objects.filter(revoked_at__isnull=True).count() == 0
    assert not config.exists()
    everything = out + err + got.stderr + listed.stdout + listed.stderr + exported.stderr
    assert vend_token not in everything
