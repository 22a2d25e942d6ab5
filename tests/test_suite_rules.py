"""The suite's own rules (issue 12): shared fixtures are plugins, asked for by name and never
imported; a test waits on a condition through tests/waiting, which fails at its deadline
naming what it waited for, and never with a polling loop of its own."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import conftest
from tests.waiting import until, wait_until

TESTS = Path(__file__).resolve().parent


def suite_modules() -> list[Path]:
    return sorted(TESTS.glob("*.py"))


def is_fixture(value: object) -> bool:
    # pytest 8.4 wraps a fixture in a FixtureFunctionDefinition; before, it marked the function.
    return type(value).__name__ == "FixtureFunctionDefinition" or hasattr(
        value, "_pytestfixturefunction"
    )


def imported_from_the_suite(path: Path) -> Iterator[tuple[str, str]]:
    """(module, name) for every ``from tests.x import name`` in the file, nested ones too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
            for alias in node.names:
                yield node.module or "", alias.name


def test_wait_until_returns_what_the_condition_gave() -> None:
    answers = iter([0, None, "", "ready"])
    assert wait_until(lambda: next(answers), timeout=5, what="readiness", interval=0) == "ready"


def test_wait_until_fails_at_its_deadline_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"gave up after 0\.05s waiting for the moon"):
        wait_until(lambda: False, timeout=0.05, what="the moon", interval=0.01)


def test_what_is_asked_at_the_deadline_so_it_can_say_what_it_saw() -> None:
    looks: list[int] = []

    def look() -> bool:
        looks.append(1)
        return False

    with pytest.raises(AssertionError, match=r"the moon \(looked [1-9]\d* times\)"):
        wait_until(
            look, timeout=0.05, what=lambda: f"the moon (looked {len(looks)} times)", interval=0.01
        )


async def test_until_awaits_a_coroutine_condition_and_fails_at_its_deadline() -> None:
    answers = iter([False, False, True])

    async def soon() -> bool:
        return next(answers)

    assert await until(soon, timeout=5, what="a yes", interval=0) is True

    async def never() -> bool:
        return False

    with pytest.raises(AssertionError, match=r"gave up after 0\.05s waiting for a yes"):
        await until(never, timeout=0.05, what="a yes", interval=0.01)
    with pytest.raises(AssertionError, match="waiting for a plain no"):
        await until(lambda: 0, timeout=0.05, what="a plain no", interval=0.01)


def test_no_module_imports_a_fixture() -> None:
    """A fixture imported into a test module shadows the plugin's and needs a noqa."""
    imported = [
        f"{path.name}: {name} from {module}"
        for path in suite_modules()
        for module, name in imported_from_the_suite(path)
        if is_fixture(getattr(importlib.import_module(module), name, None))
    ]
    assert imported == []


def test_every_module_of_shared_fixtures_is_a_registered_plugin() -> None:
    shared = {
        f"tests.{path.stem}"
        for path in suite_modules()
        if not path.stem.startswith("test_") and path.stem != "conftest"
        if any(map(is_fixture, vars(importlib.import_module(f"tests.{path.stem}")).values()))
    }
    assert shared == set(conftest.pytest_plugins)


def test_no_polling_loop_outside_tests_waiting() -> None:
    """A ``while`` that sleeps is a wait of its own, free to carry on silently at its end."""

    def sleeps(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "sleep"
        )

    loops = [
        f"{path.name}:{loop.lineno}"
        for path in suite_modules()
        if path.name != "waiting.py"
        for loop in ast.walk(ast.parse(path.read_text()))
        if isinstance(loop, ast.While) and any(map(sleeps, ast.walk(loop)))
    ]
    assert loops == []
