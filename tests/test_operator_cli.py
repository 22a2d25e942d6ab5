"""What a new operator and their agents trip over (issue 20), told as they meet it: the
`keybroker` CLI as a subprocess and `manage.py` in this process, against the real server."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import call_command

from broker.models import Backend
from broker.services.agents import agent_enroll
from tests.conftest import REPO, clean_env

pytestmark = pytest.mark.django_db(transaction=True)


class AgentShell:
    """One agent machine: its own config directory, the CLI run as a person types it."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        home = tmp_path / name
        self.env = clean_env(XDG_CONFIG_HOME=str(home / "xdg"), HOME=str(home))

    def __call__(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keybroker.cli", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
        )


def manage(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_a_rejected_agent_is_told_the_admins_reason(
    live_url: str, anthropic: Backend, tmp_path: Path
) -> None:
    bob = AgentShell(tmp_path, "bob")
    enrolled = bob("enroll", live_url, "--name", "bob", "--can", "anthropic", "--timeout", "0")
    assert enrolled.returncode == 0, enrolled.stderr
    manage("agent", "reject", "bob", "--reason", "use the staging broker for CI")

    status = bob("status")
    assert status.returncode == 0, status.stderr
    assert "status:     rejected" in status.stdout
    assert "rejected:   anthropic (use the staging broker for CI)" in status.stdout
    got = bob("get", "anthropic")
    assert got.returncode != 0
    assert "agent bob was rejected by an admin: use the staging broker for CI" in got.stderr
    # enroll again (it keeps its enrollment) says it too.
    again = bob("enroll", live_url, "--name", "bob", "--can", "anthropic", "--timeout", "1s")
    assert "an admin rejected bob (use the staging broker for CI)" in again.stderr


def test_status_prints_the_limits_and_what_is_left(
    live_url: str,
    anthropic: Backend,
    staging: Backend,
    alice: AbstractBaseUser,
    tmp_path: Path,
    settings: Any,
) -> None:
    settings.PUBLIC_URL = live_url  # the server runs in this process
    vend_token = manage("agent", "create", "carol", "--can", "anthropic").strip()
    manage(
        "agent", "grant", "carol", "anthropic", "--models", "claude-haiku-*", "--rpm", "30",
        "--daily-tokens", "2000000", "--max-tokens", "4096",
    )  # fmt: skip
    # On carol's machine: the token `agent create` printed, from stdin; no config by hand.
    carol = AgentShell(tmp_path, "carol")
    login = carol("login", live_url, "--vend-token", "-", stdin=vend_token + "\n")
    assert login.returncode == 0, login.stderr
    config = Path(carol.env["XDG_CONFIG_HOME"]) / "keybroker" / "config.json"
    assert login.stdout == (
        f"logged in as carol at {live_url} (approved; may use anthropic); config in {config}\n"
    )
    assert config.stat().st_mode & 0o777 == 0o600
    assert vend_token not in login.stdout + login.stderr
    status = carol("status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("  anthropic  ")))
    assert lines[at + 1 : at + 4] == [
        "    models: claude-haiku-*",
        "    max_tokens per request: 4096",
        "    requests/min: 30, used 0, 30 requests left",
    ]
    # The day's budget renews at midnight UTC, whenever this runs.
    assert lines[at + 4].startswith("    tokens today: 2000000, used 0, 2000000 tokens left, ")
    assert " renews in " in lines[at + 4]

    # A typo in the backend's name: the agent learns the names it may use, no others.
    typo = carol("get", "anthropc")
    assert typo.returncode != 0
    assert (
        "no backend named 'anthropc'; agent carol may use anthropic (`keybroker status` lists them)"
    ) in typo.stderr
    assert "anthropic-staging" not in typo.stderr
    # A backend that exists but is not granted: the command that asks for it.
    ungranted = carol("get", "anthropic-staging")
    assert (
        "agent carol has no grant for backend anthropic-staging; ask for it with "
        "`keybroker request --can anthropic-staging`"
    ) in ungranted.stderr


def test_an_agent_enrolled_from_the_api_sees_no_rejection_while_it_waits(
    live_url: str, anthropic: Backend, alice: AbstractBaseUser
) -> None:
    import httpx

    enrolled = agent_enroll(name="dave", scopes=["anthropic"])
    auth = {"Authorization": f"Bearer {enrolled.vend_token}"}
    waiting = httpx.get(f"{live_url}/v1/enroll/status", headers=auth).json()
    assert (waiting["status"], waiting["rejection"]) == ("pending", None)
    manage("agent", "reject", "dave")
    rejected = httpx.get(f"{live_url}/v1/enroll/status", headers=auth).json()
    assert rejected["rejection"] == {"declined": ["anthropic"], "reason": ""}
    refused = httpx.post(f"{live_url}/v1/credentials/anthropic", headers=auth, json={})
    assert (refused.status_code, refused.json()["error"]["message"]) == (
        403,
        "agent dave was rejected by an admin",
    )


def test_login_with_a_wrong_token_writes_nothing(
    live_url: str, anthropic: Backend, tmp_path: Path
) -> None:
    erin = AgentShell(tmp_path, "erin")
    config = Path(erin.env["XDG_CONFIG_HOME"]) / "keybroker" / "config.json"
    pasted_key = erin("login", live_url, "--vend-token", "-", stdin="sk-ant-api03-oops\n")
    assert pasted_key.returncode == 2
    assert "a vend token starts with ckr_ (what `manage.py agent create` printed)" in (
        pasted_key.stderr
    )
    unknown = erin("login", live_url, "--vend-token", "-", stdin="ckr_" + "x" * 40 + "\n")
    assert unknown.returncode == 6
    assert "invalid, expired or unknown agent credential" in unknown.stderr
    assert "x" * 40 not in unknown.stderr
    assert not config.exists()
