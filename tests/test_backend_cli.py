from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command

from broker.models import AdminToken, Backend
from tests.conftest import REPO, clean_env, free_port
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


def run_failing(*args: str, stdin: str = "") -> tuple[str, CommandError]:
    """A command expected to exit non-zero: what it printed and its error."""
    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with pytest.raises(CommandError) as failed:
            call_command(*args, stdout=out, stderr=io.StringIO())
    finally:
        sys.stdin = old_stdin
    return out.getvalue(), failed.value


def test_the_backend_lifecycle_from_the_command_line(fake_anthropic: FakeAnthropic) -> None:
    """A new operator pastes a wrong key first: it is refused at once, not queued."""
    first, second = api_key(tail="F1rs"), api_key(tail="S3cd")
    fake_anthropic.valid_keys.add(second)
    url = fake_anthropic.url
    _, refused = run_failing("backend", "add", "anthropic", "--api-key", first, "--base-url", url)
    # The exit status `backend validate` gives an invalid key, the upstream's reason, and
    # the way out; nothing was stored.
    assert refused.returncode == 3
    assert str(refused) == (
        f"{url.removeprefix('http://')} refused this key (upstream answered 401 "
        "(authentication_error: invalid x-api-key)); nothing was saved: check that it is the "
        "whole key, of the right account; to store it anyway, add --allow-invalid"
    )
    assert not Backend.objects.exists()
    added, stored_invalid = run_failing(
        "backend", "add", "anthropic", "--api-key", first, "--base-url", url, "--allow-invalid"
    )
    assert stored_invalid.returncode == 3
    assert "stored, as --allow-invalid asked" in str(stored_invalid)
    listed = run("backend", "ls")
    validated = io.StringIO()
    with pytest.raises(CommandError) as invalid:
        call_command("backend", "validate", "anthropic", stdout=validated)
    # A key that does not work is not exit 0, and the error names the next step.
    assert invalid.value.returncode == 3
    assert str(invalid.value) == (
        "the key of anthropic is invalid: replace it with `manage.py backend rotate anthropic`"
    )
    _, rotation_refused = run_failing(
        "backend", "rotate", "anthropic", "--api-key", "-", stdin=api_key(tail="Wr0n") + "\n"
    )
    assert rotation_refused.returncode == 3
    assert "refused this key" in str(rotation_refused)
    outputs = [
        added,
        listed,
        validated.getvalue(),
        run("backend", "rotate", "anthropic", "--api-key", "-", stdin=second + "\n"),
        run("backend", "validate", "anthropic"),
        run("backend", "inspect", "anthropic"),
    ]
    assert outputs[0].splitlines() == [
        "added backend anthropic (sk-ant-api03-…F1rs)",
        "anthropic: saved, but invalid: upstream answered 401 (authentication_error: invalid "
        "x-api-key); calls with it fail until it is replaced (`manage.py backend rotate "
        "anthropic`)",
    ]
    assert "anthropic" in outputs[1]
    assert "sk-ant-api03-…F1rs" in outputs[1]
    assert "invalid" in outputs[1]
    assert outputs[2].startswith("anthropic: invalid (upstream answered 401")
    assert outputs[3].splitlines() == [
        "rotated anthropic: sk-ant-api03-…F1rs -> sk-ant-api03-…S3cd",
        f"anthropic: valid: {url.removeprefix('http://')} accepted the key",
    ]
    assert outputs[4].startswith("anthropic: valid")
    inspected = json.loads(run("backend", "inspect", "anthropic", "--json"))
    assert inspected["validation"]["state"] == "valid"
    for output in [*outputs, json.dumps(inspected), str(refused), str(rotation_refused)]:
        assert first not in output
        assert second not in output
    assert run("backend", "rm", "anthropic") == "removed backend anthropic\n"
    assert not Backend.objects.exists()


def test_a_good_key_is_checked_on_add_and_in_the_pool(fake_anthropic: FakeAnthropic) -> None:
    key, spare, wrong = api_key(tail="G00d"), api_key(tail="Sp4r"), api_key(tail="Wr0n")
    fake_anthropic.valid_keys |= {key, spare}
    added = run("backend", "add", "anthropic", "--api-key", key, "--base-url", fake_anthropic.url)
    host = fake_anthropic.url.removeprefix("http://")
    assert added.splitlines() == [
        "added backend anthropic (sk-ant-api03-…G00d)",
        f"anthropic: valid: {host} accepted the key",
    ]
    # The check is the upstream's GET /v1/models with that key, made before the command ends.
    assert [r.path for r in fake_anthropic.requests] == ["/v1/models"]
    assert Backend.objects.get().validation_state == "valid"
    _, refused = run_failing("backend", "key-add", "anthropic", "--api-key", wrong)
    assert refused.returncode == 3
    assert "refused this key" in str(refused)
    assert Backend.objects.get().keys.count() == 1
    pooled = run("backend", "key-add", "anthropic", "--api-key", spare)
    assert pooled.splitlines()[-1] == f"anthropic: valid: {host} accepted the key"


def test_an_unreachable_upstream_saves_the_key_unchecked_and_says_so() -> None:
    # Nothing listens on this port: the check cannot reach the upstream.
    url = f"http://127.0.0.1:{free_port()}"
    out, unreachable = run_failing(
        "backend", "add", "anthropic", "--api-key", api_key(), "--base-url", url
    )
    assert unreachable.returncode == 4
    assert "stored unchecked" in str(unreachable)
    assert "saved unchecked: cannot reach 127.0.0.1" in out
    assert "the scheduled validation (every 60 min) checks it again" in out
    assert "`manage.py backend validate anthropic`" in out
    assert Backend.objects.get().validation_state == "unreachable"


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


def test_it_prompts_without_echo_in_a_terminal(
    monkeypatch: pytest.MonkeyPatch, fake_anthropic: FakeAnthropic
) -> None:
    key = api_key()
    fake_anthropic.valid_keys.add(key)
    prompts: list[str] = []
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or key)
    out = io.StringIO()
    call_command("backend", "add", "anthropic", "--base-url", fake_anthropic.url, stdout=out)
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
    where, error = result.stderr.strip().splitlines()
    assert where.startswith(f"keybroker: database: SQLite {tmp_path}")
    assert error == (
        "CommandError: name: use 1-63 lowercase letters, digits and dashes, starting and ending "
        "with a letter or digit"
    )
