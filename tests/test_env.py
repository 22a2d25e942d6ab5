from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from broker.project.env import env_bool, env_int, env_secret, generated_secret


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("YES", True), ("off", False), ("", False)]
)
def test_env_bool_reads_the_usual_spellings(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool
) -> None:
    monkeypatch.setenv("KB_FLAG", raw)
    assert env_bool("KB_FLAG", default=not expected) is expected


def test_env_bool_refuses_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="KB_FLAG"):
        env_bool("KB_FLAG", default=False)


def test_env_int_names_the_variable_and_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_PORT", "eighty")
    with pytest.raises(ImproperlyConfigured, match="KB_PORT must be an integer"):
        env_int("KB_PORT", default=1)
    monkeypatch.setenv("KB_PORT", "70000")
    with pytest.raises(ImproperlyConfigured, match="at most 65535"):
        env_int("KB_PORT", default=1, maximum=65535)
    monkeypatch.setenv("KB_PORT", "8080")
    assert env_int("KB_PORT", default=1, maximum=65535) == 8080


def test_env_secret_reads_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret-from-file\n")
    monkeypatch.delenv("KB_SECRET", raising=False)
    monkeypatch.setenv("KB_SECRET_FILE", str(secret_file))
    assert env_secret("KB_SECRET") == "s3cret-from-file"


def test_env_secret_refuses_both_sources_and_missing_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KB_SECRET", "inline")
    monkeypatch.setenv("KB_SECRET_FILE", str(tmp_path / "x"))
    with pytest.raises(ImproperlyConfigured, match="not both"):
        env_secret("KB_SECRET")
    monkeypatch.delenv("KB_SECRET")
    with pytest.raises(ImproperlyConfigured, match="cannot read"):
        env_secret("KB_SECRET")


def test_generated_secret_is_private_stable_and_created_once(tmp_path: Path) -> None:
    path = tmp_path / "secret_key"
    with ThreadPoolExecutor(8) as pool:
        values = set(pool.map(lambda _: generated_secret(path), range(16)))
    assert len(values) == 1
    (value,) = values
    assert len(value) >= 48
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert generated_secret(path) == value
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]
