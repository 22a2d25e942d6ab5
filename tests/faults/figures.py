"""The figures each fault case reports, and the table of docs/reliability.md they make."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TABLE_START = "<!-- figures: written by tests/faults (KEYBROKER_WRITE_RELIABILITY=1) -->"
TABLE_END = "<!-- end of figures -->"


@dataclass(frozen=True)
class Figure:
    case: str
    load: str
    faults: str
    refused: str
    lost: int
    holds: str


class Figures:
    """What each case did and saw, in the order the cases ran."""

    def __init__(self) -> None:
        self.rows: dict[str, Figure] = {}

    def add(self, figure: Figure) -> None:
        self.rows[figure.case] = figure

    def table(self) -> str:
        lines = [
            "| Case | Load | Faults injected | Calls refused | Events lost | What holds |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {f.case} | {f.load} | {f.faults} | {f.refused} | {f.lost} | {f.holds} |"
            for f in self.rows.values()
        ]
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        """Replace the table between the markers in ``path``, leaving the prose alone."""
        table = f"{TABLE_START}\n{self.table()}\n{TABLE_END}"
        pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.DOTALL)
        path.write_text(pattern.sub(lambda _: table, path.read_text()))
