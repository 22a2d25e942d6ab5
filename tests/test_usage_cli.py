"""Usage end to end: calls through the real proxy, recorded with the agent's id, rolled up by
the task, and read by `keybroker usage` as a subprocess, which shows its own calls only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import AbstractBaseUser

from audit.models import AuditEvent
from audit.tasks import usage_rollup_task
from broker.services.agents import agent_enroll
from broker.services.tokens import token_issue
from tests.conftest import REPO, clean_env
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import audit_drained, proxied_for

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 8,
           "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip


def test_keybroker_usage_shows_the_agents_own_calls_only(
    live_url: str,
    fake_anthropic: FakeAnthropic,
    alice: AbstractBaseUser,
    tmp_path: Path,
    settings: Any,
) -> None:
    settings.PUBLIC_URL = live_url
    carol = proxied_for(live_url=live_url, fake=fake_anthropic, alice=alice, name="carol")
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice)
    bob_token = token_issue(agent=bob.agent, backend_name="anthropic", ttl="30m").plaintext
    proxy = httpx.Client(base_url=carol.base_url, timeout=10)
    for token in (bob_token, bob_token, carol.token):
        assert proxy.post("/v1/messages", json=MESSAGE, headers={"x-api-key": token}).is_success
    assert proxy.get("/v1/models", headers={"x-api-key": bob_token[:-3] + "xyz"}).status_code == 401
    audit_drained()
    # The proxy's recorder writes each call with its agent's id (issue 20, item 9).
    carol_id = AuditEvent.objects.get(action="token.issued", agent="carol").agent_id
    calls = AuditEvent.objects.filter(action="proxy.request", status=200)
    assert sorted(e.agent_id for e in calls) == sorted([bob.agent.pk, bob.agent.pk, carol_id])
    usage_rollup_task.apply()

    config = tmp_path / "xdg" / "keybroker" / "config.json"
    config.parent.mkdir(parents=True)
    saved = {"url": live_url, "name": "bob", "agent_id": str(bob.agent.pk)}
    config.write_text(json.dumps({**saved, "vend_token": bob.vend_token}))
    os.chmod(config, 0o600)
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path))

    def keybroker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keybroker.cli", *args],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    table = keybroker("usage", "--by", "model", "--since", "1d")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].endswith("(UTC)")
    assert lines[1].split()[:3] == ["MODEL", "CALLS", "ERRORS"]
    # Two calls of 12 in / 6 out, 3 cache reads each, priced: bob's alone.
    assert lines[2].split()[:8] == ["claude-haiku-4-5", "2", "0", "0", "24", "12", "6", "0"]
    assert lines[-1].split()[:2] == ["TOTAL", "2"]

    as_json = keybroker("usage", "--by", "agent", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert [(g["agent_id"], g["agent"], g["calls"]) for g in data["groups"]] == [
        (str(bob.agent.pk), "bob", 2)
    ]
    assert "carol" not in as_json.stdout + table.stdout

    bad = keybroker("usage", "--since", "a while")
    assert bad.returncode == 1
    assert bad.stderr.startswith("keybroker: since: a date, an ISO 8601 time or a duration")
    assert bob.vend_token not in table.stdout + as_json.stdout + bad.stderr
