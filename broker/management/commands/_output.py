"""Helpers shared by the server CLI commands."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.core.management.base import CommandError

from broker.infra.errors import ServiceError


@contextmanager
def service_errors() -> Iterator[None]:
    """Render a service's refusal as one line and exit code 1."""
    try:
        yield
    except ServiceError as exc:
        raise CommandError(exc.message) from None


def read_secret(value: str | None, *, prompt: str) -> str:
    """``--api-key KEY``, ``--api-key -`` (stdin) or a prompt without echo."""
    if value == "-":
        return sys.stdin.readline().strip()
    if value:
        return value
    if not sys.stdin.isatty():
        raise CommandError("give the secret with --api-key KEY, or --api-key - to read stdin")
    return getpass.getpass(prompt)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def manage_py() -> str:
    """How the operator runs manage.py from here: ``.venv/bin/python manage.py`` when this
    Python is the checkout's virtualenv (a bare ``python`` may be another one)."""
    python = os.path.relpath(sys.executable)
    if python.startswith(".."):
        return "python manage.py"
    # A virtualenv's python3.11 is also its python, the name README uses.
    return f"{os.path.join(os.path.dirname(python), 'python')} manage.py"


def framed(lines: Sequence[str]) -> str:
    """Lines in a box, so they stand out from the log lines around them."""
    width = max(len(line) for line in lines)
    bar = "+" + "-" * (width + 2) + "+"
    return "\n".join([bar, *(f"| {line.ljust(width)} |" for line in lines), bar])


def first_admin_box(*, name: str, password: str, url: str) -> str:
    """The generated password of the first admin, once, with where to change it."""
    return framed(
        [
            f"The first admin: user {name}, password {password}",
            "It is shown only this once and kept nowhere.",
            f"Log in at {url}/admin/ and change it there (Change password,",
            f"top right), or run: {manage_py()} changepassword {name}",
        ]
    )
