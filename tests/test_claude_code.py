"""Claude Code itself (`claude -p`) through the proxy, against the fake upstream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.models import Token
from tests.conftest import REPO, clean_env
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Enrolled, Proxied

pytestmark = pytest.mark.django_db(transaction=True)


def claude_binary() -> str:
    found = os.environ.get("KEYBROKER_CLAUDE_BIN") or shutil.which("claude")
    local = REPO / ".ci" / "node" / "node_modules" / ".bin" / "claude"
    if not found and local.exists():
        found = str(local)
    if not found:
        pytest.skip(
            "Claude Code is not installed (npm install --prefix .ci/node "
            "@anthropic-ai/claude-code, or set KEYBROKER_CLAUDE_BIN); "
            "tests/test_proxy_wire.py replays its request shape instead"
        )
    return found


@pytest.mark.parametrize("variable", ["ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"])
def test_claude_p_works_through_the_proxy(
    proxied: Proxied, fake_anthropic: FakeAnthropic, tmp_path: Path, variable: str
) -> None:
    claude = claude_binary()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ANTHROPIC_BASE_URL": proxied.base_url,
        variable: proxied.token,
        # No calls anywhere but the proxy.
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    result = subprocess.run(
        [claude, "-p", "say hi"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "word0 word1 word2 word3 word4"
    messages = [r for r in fake_anthropic.requests if r.path == "/v1/messages"]
    assert messages, "Claude Code's request never reached the upstream"
    seen = messages[-1]
    assert seen.query == "beta=true"
    assert seen.headers["user-agent"].startswith("claude-cli/")
    assert "claude-code-20250219" in seen.headers["anthropic-beta"]
    assert seen.headers["x-api-key"] == proxied.key
    assert "authorization" not in seen.headers
    for request in fake_anthropic.requests:
        assert proxied.token not in str(request.headers)


def test_claude_uses_keybroker_as_its_api_key_helper(
    bob_enrolled: Enrolled, fake_anthropic: FakeAnthropic, tmp_path: Path
) -> None:
    """`keybroker claude-settings --write` in a project, then `claude -p` there with no
    token in its environment: Claude Code runs `keybroker get --cached` for its key."""
    claude = claude_binary()
    project = tmp_path / "project"
    project.mkdir()
    written = subprocess.run(
        [sys.executable, "-m", "keybroker.cli", "--config", str(bob_enrolled.config),
         "claude-settings", "--ttl", "1m", "--write"],
        cwd=project, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    settings = json.loads((project / ".claude" / "settings.json").read_text())
    assert "--cached" in settings["apiKeyHelper"]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    for _ in range(2):
        result = subprocess.run(
            [claude, "-p", "say hi"], cwd=project, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == "word0 word1 word2 word3 word4"
    # Both sessions (and the settings command) shared the one cached 1-minute token.
    (token,) = Token.objects.filter(agent=bob_enrolled.agent)
    assert token.ttl_seconds == 60
    messages = [r for r in fake_anthropic.requests if r.path == "/v1/messages"]
    assert len(messages) >= 2
    assert all(seen.headers["x-api-key"] == bob_enrolled.key for seen in messages)
    cached = json.loads((bob_enrolled.config.parent / "tokens.json").read_text())
    plaintext = cached["tokens"]["anthropic 60s"]["token"]
    for request in fake_anthropic.requests:
        assert plaintext not in str(request.headers)
