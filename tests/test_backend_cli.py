from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command

from broker.models import AdminToken, Backend
from tests.conftest import REPO, clean_env
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key

pytestmark = pytest.mark.django_db


def run(*args: str, stdin: str = "") -> str:
    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        call_command(*args, stdout=out, stderr=io.StringIO())
    finally:
        sys.stdin = old_stdin
    return out.getvalue()


def test_the_backend_lifecycle_from_the_command_line(fake_anthropic: FakeAnthropic) -> None:
    first, second = api_key(tail="F1rs"), api_key(tail="S3cd")
    fake_anthropic.valid_keys.add(second)
    added = run("backend", "add", "anthropic", "--api-key", first, "--base-url", fake_anthropic.url)
    listed = run("backend", "ls")
    validated = io.StringIO()
    with pytest.raises(CommandError) as invalid:
        call_command("backend", "validate", "anthropic", stdout=validated)
    # A key that does not work is not exit 0, and the error names the next step.
    assert invalid.value.returncode == 3
    assert str(invalid.value) == (
        "the key of anthropic is invalid: replace it with `manage.py backend rotate anthropic`"
    )
    outputs = [
        added,
        listed,
        validated.getvalue(),
        run("backend", "rotate", "anthropic", "--api-key", "-", stdin=second + "\n"),
        run("backend", "validate", "anthropic"),
        run("backend", "inspect", "anthropic"),
    ]
    assert "added backend anthropic (sk-ant-api03-…F1rs)" in outputs[0]
    assert "anthropic" in outputs[1]
    assert "sk-ant-api03-…F1rs" in outputs[1]
    assert outputs[2].startswith("anthropic: invalid (upstream answered 401")
    assert "sk-ant-api03-…F1rs -> sk-ant-api03-…S3cd" in outputs[3]
    assert outputs[4].startswith("anthropic: valid")
    inspected = json.loads(run("backend", "inspect", "anthropic", "--json"))
    assert inspected["validation"]["state"] == "valid"
    for output in [*outputs, json.dumps(inspected)]:
        assert first not in output
        assert second not in output
    assert run("backend", "rm", "anthropic") == "removed backend anthropic\n"
    assert not Backend.objects.exists()


def test_bad_input_is_one_clear_error_and_saves_nothing() -> None:
    with pytest.raises(CommandError, match="name: use 1-63 lowercase"):
        run("backend", "add", "Not Valid", "--api-key", api_key())
    with pytest.raises(CommandError, match="secret: an Anthropic secret is an API key"):
        run("backend", "add", "anthropic", "--api-key", "hunter2")
    with pytest.raises(CommandError, match="base_url: must use https://"):
        run("backend", "add", "anthropic", "--api-key", api_key(), "--base-url", "http://x.example")
    with pytest.raises(CommandError, match="no backend named 'ghost'"):
        run("backend", "inspect", "ghost")
    assert not Backend.objects.exists()


def test_without_a_terminal_the_key_must_be_given() -> None:
    with pytest.raises(CommandError, match="--api-key"):
        run("backend", "add", "anthropic")
    assert not Backend.objects.exists()


def test_it_prompts_without_echo_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    key = api_key()
    prompts: list[str] = []
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or key)
    out = io.StringIO()
    call_command("backend", "add", "anthropic", stdout=out)
    assert prompts == ["API key (not echoed): "]
    assert Backend.objects.get().secret == key


def test_admintoken_prints_the_token_once_and_lists_only_prefixes(django_user_model: type) -> None:
    django_user_model.objects.create_superuser("alice", password="pw-alice-123")  # type: ignore[attr-defined]
    token = run("admintoken", "create", "ci", "--user", "alice").strip()
    assert token.startswith("cka_")
    assert len(token) >= 4 + 43
    listing = run("admintoken", "ls")
    assert token not in listing
    assert token[:12] in listing
    token_id = AdminToken.objects.get().pk
    assert f"revoked admin token {token_id}" in run("admintoken", "revoke", str(token_id))
    assert "revoked" in run("admintoken", "ls")


def test_the_command_runs_as_an_operator_types_it(tmp_path: object) -> None:
    """One real subprocess, so argument parsing and exit codes are what a shell sees."""
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "backend",
            "add",
            "Bad Name",
            "--api-key",
            "sk-ant-api03-xxxxxxxxxx",
        ],
        cwd=REPO,
        env=clean_env(KEYBROKER_DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "CommandError: name: use 1-63 lowercase letters, digits and dashes, starting and ending "
        "with a letter or digit"
    ]
