"""The import contracts (pyproject.toml, [tool.importlinter]) hold, and would catch a break.

`make lint` runs `lint-imports` on the real tree; these tests show the contracts are not
vacuous: each planted import below, in a copy of the tree, breaks the build.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# Each package and where it lives in the checkout (the agent side is its own distribution).
PACKAGES = {
    "broker": "broker",
    "proxy": "proxy",
    "audit": "audit",
    "keybroker": "agent/keybroker",
}


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package, source in PACKAGES.items():
        shutil.copytree(
            REPO / source, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    result = _lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("broker/services/planted.py", "import proxy.app", "broker never imports proxy"),
        ("broker/selectors/planted.py", "from proxy import policy", "broker never imports proxy"),
        ("keybroker/planted.py", "import django", "the keybroker package is Django-free"),
        ("keybroker/planted.py", "import broker.models", "the keybroker package is Django-free"),
        ("broker/infra/planted.py", "import broker.services.tokens", "no import cycles"),
    ],
)
def test_a_planted_import_breaks_its_contract(
    tree: Path, module: str, line: str, contract: str
) -> None:
    (tree / module).write_text(f"{line}  # planted by tests/test_architecture.py\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if " BROKEN" in row]
    assert any(contract in row for row in broken), result.stdout
