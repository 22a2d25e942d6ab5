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

    def table(self, kept: dict[str, str] | None = None) -> str:
        """The table: ``kept`` rows (by case, as written before) with this session's rows
        in place of theirs, and its new cases after them."""
        lines = dict(kept or {})
        lines.update(
            (f.case, f"| {f.case} | {f.load} | {f.faults} | {f.refused} | {f.lost} | {f.holds} |")
            for f in self.rows.values()
        )
        header = [
            "| Case | Load | Faults injected | Calls refused | Events lost | What holds |",
            "|---|---|---|---|---|---|",
        ]
        return "\n".join(header + list(lines.values()))

    def write(self, path: Path) -> None:
        """Replace the table between the markers in ``path``, leaving the prose alone, and
        the rows of cases that did not run this session (a case run alone rewrites its own
        rows only; a case removed from the suite has its row removed by hand)."""
        pattern = re.compile(re.escape(TABLE_START) + "(.*?)" + re.escape(TABLE_END), re.DOTALL)
        text = path.read_text()
        found = pattern.search(text)
        kept = {}
        for line in (found[1] if found else "").splitlines()[3:]:  # "", header, rule
            if line.startswith("| "):
                kept[line[2:].split(" | ", 1)[0]] = line
        table = f"{TABLE_START}\n{self.table(kept)}\n{TABLE_END}"
        path.write_text(pattern.sub(lambda _: table, text))
