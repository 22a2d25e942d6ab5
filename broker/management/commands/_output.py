"""Helpers shared by the server CLI commands."""

from __future__ import annotations

import getpass
import json
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
