"""A new operator's shells (issue 20, item 8): a .env file in the directory (or
KEYBROKER_ENV_FILE) fills in what the environment leaves unset, and every manage.py command
says on stderr which database and Redis it uses, so a shell that forgot DATABASE_URL does
not quietly work on the default SQLite file. manage.py runs as a subprocess, as typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, clean_env


def manage(
    cwd: Path, *args: str, env_file: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = clean_env(**env)
    # clean_env points KEYBROKER_ENV_FILE at /dev/null; these shells read theirs.
    environment.pop("KEYBROKER_ENV_FILE")
    if env_file is not None:
        environment["KEYBROKER_ENV_FILE"] = env_file
    return subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_dotenv_file_in_the_directory_is_read_and_named(tmp_path: Path) -> None:
    database = tmp_path / "from-dotenv.sqlite3"
    (tmp_path / ".env").write_text(
        f"# the operator's settings\nKEYBROKER_DATA_DIR={tmp_path / 'data'}\n"
        f"DATABASE_URL=sqlite:///{database}\n"
    )
    migrated = manage(tmp_path, "migrate", "-v0")
    assert migrated.returncode == 0, migrated.stderr
    assert database.exists()
    assert migrated.stderr.splitlines()[0] == (
        f"keybroker: database: SQLite {database}; redis: the embedded one on "
        f"{tmp_path / 'data' / 'redis.sock'} (REDIS_URL is not set); settings from "
        f"{tmp_path / '.env'}"
    )
    # A command whose stdout is captured with $(...) prints only its result there.
    token = manage(tmp_path, "admintoken", "create", "laptop", "--user", "nobody")
    assert token.stdout == ""  # refused: no such user, and nothing else on stdout
    assert token.stderr.startswith("keybroker: database: SQLite ")

    # A variable set in the shell wins over the file's.
    other = tmp_path / "from-shell.sqlite3"
    shell = manage(tmp_path, "migrate", "-v0", DATABASE_URL=f"sqlite:///{other}")
    assert shell.returncode == 0, shell.stderr
    assert shell.stderr.startswith(f"keybroker: database: SQLite {other}; ")
    assert other.exists()


def test_without_database_url_the_fallback_is_said_out_loud(tmp_path: Path) -> None:
    listed = manage(tmp_path, "migrate", "-v0", KEYBROKER_DATA_DIR=str(tmp_path / "var"))
    assert listed.returncode == 0, listed.stderr
    first = listed.stderr.splitlines()[0]
    assert first == (
        f"keybroker: database: SQLite {tmp_path / 'var' / 'keybroker.sqlite3'} (DATABASE_URL "
        f"is not set); redis: the embedded one on {tmp_path / 'var' / 'redis.sock'} "
        "(REDIS_URL is not set)"
    )


def test_the_line_never_holds_a_password(tmp_path: Path) -> None:
    env_file = tmp_path / "keybroker.env"
    env_file.write_text(
        "DATABASE_URL=postgres://kb:hunter2@127.0.0.1:1/keybroker\n"
        "REDIS_URL=redis://:s3cret-pw@127.0.0.1:1/0\n"
        f"KEYBROKER_DATA_DIR={tmp_path / 'data'}\n"
    )
    # Nothing listens on port 1: the command fails after saying where it went.
    failed = manage(tmp_path, "backend", "ls", env_file=str(env_file))
    assert failed.returncode != 0
    assert failed.stderr.splitlines()[0] == (
        "keybroker: database: postgresql kb@127.0.0.1:1/keybroker; redis: "
        f"redis://127.0.0.1:1/0; settings from {env_file}"
    )
    assert "hunter2" not in failed.stderr + failed.stdout
    assert "s3cret-pw" not in failed.stderr + failed.stdout


def test_a_missing_env_file_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.env"
    refused = manage(tmp_path, "backend", "ls", env_file=str(missing))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"keybroker: configuration error: KEYBROKER_ENV_FILE names {missing}, which is not a file"
    ]
