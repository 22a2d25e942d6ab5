"""The agent side as its own distribution (issue 20, item 2): on an agent's machine,
`pip install keybroker` (or `pip install ./agent` from a checkout) brings the `keybroker`
command and httpx, and nothing of the server. Built here as PyPI would get it (sdist, then
the wheel from the sdist) without a package index, installed into a fresh virtualenv, and
run there. `make agent-check` does the same with httpx from the index."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


def closure(name: str) -> set[str]:
    """``name`` and every distribution it needs here, as installed in this virtualenv."""
    found, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current.lower() in found:
            continue
        found.add(current.lower())
        for line in distribution(current).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(
                {**default_environment(), "extra": ""}
            ):
                todo.append(requirement.name)
    return found


def copy_installed(names: set[str], site_packages: Path) -> None:
    """Put these installed distributions (code and metadata) into another virtualenv, as
    pip would have: the test needs no package index."""
    for name in names:
        for file in distribution(name).files or []:
            source = Path(str(file.locate()))
            if source.is_file() and "__pycache__" not in source.parts:
                target = site_packages / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    made = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO / "agent")
    assert made.returncode == 0, made.stdout + made.stderr
    return out


def test_the_agent_distribution_holds_the_cli_and_needs_only_httpx(built: Path) -> None:
    [wheel] = built.glob("keybroker-*.whl")
    [sdist] = built.glob("keybroker-*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith("-info")}
    assert packages == {"keybroker"}
    assert {"keybroker/cli.py", "keybroker/wire.py", "keybroker/__init__.py"} <= set(names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires[0] == "Requires-Dist: httpx<0.29,>=0.28"
    assert requires[1:] == ['Requires-Dist: anthropic<3,>=2.12; extra == "anthropic"']
    assert "Name: keybroker\n" in metadata
    assert b"keybroker = keybroker.cli:main" in entry_points
    # The sdist stands alone (the wheel above was built from it): no path outside agent/.
    with tarfile.open(sdist) as archive:
        members = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix() for m in archive}
    assert {"pyproject.toml", "README.md", "keybroker/cli.py"} <= members
    assert not [m for m in members if m.startswith(("broker", "proxy", "audit", ".."))]


def test_it_runs_in_a_fresh_virtualenv_without_django(built: Path, tmp_path: Path) -> None:
    venv = tmp_path / "agent-machine"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    pip, python = venv / "bin" / "pip", venv / "bin" / "python"
    [wheel] = built.glob("keybroker-*.whl")
    installed = run(pip, "install", "--no-index", "--no-deps", wheel)
    assert installed.returncode == 0, installed.stderr
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    copy_installed(closure("httpx"), Path(purelib.stdout.strip()))
    assert sysconfig.get_paths()["purelib"] != purelib.stdout.strip()

    checked = run(pip, "check")
    assert checked.returncode == 0, checked.stdout  # keybroker's requirement is met
    helped = run(venv / "bin" / "keybroker", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "login" in helped.stdout
    assert "enroll" in helped.stdout
    version = run(venv / "bin" / "keybroker", "--version", cwd=tmp_path)
    assert version.stdout.strip() == "keybroker 0.1.0"
    # Nothing of the server came with it.
    for module in ("django", "broker", "celery", "redis"):
        missing = run(python, "-c", f"import {module}", cwd=tmp_path)
        assert missing.returncode != 0
        assert "ModuleNotFoundError" in missing.stderr
