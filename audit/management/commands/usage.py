"""`manage.py usage [--by agent,model] [--since 7d] [--until T] [--agent A] [--backend B]
[--model M] [--refresh] [--json]`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from audit.rollups import usage_rollup
from audit.usage import DEFAULT_SINCE, GROUPS, UsageQuery, agent_label, usage_report
from broker.management.commands._output import as_json, service_errors, table

METRIC_HEADERS = [
    "CALLS", "ERRORS", "REFUSALS", "IN", "OUT", "CACHE READ", "CACHE WRITE", "COST USD",
    "TTFB P50/P95 MS",
]  # fmt: skip


class Command(BaseCommand):
    help = (
        "Calls, errors, refusals, tokens, cost and time to first byte from the usage rollups "
        "(UTC hours; the worker adds new calls every 30 s)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--by", default="", help=f"group by any of {','.join(GROUPS)}")
        parser.add_argument("--since", default=DEFAULT_SINCE, help="date, time or 7d (7d)")
        parser.add_argument("--until", help="date, time or a duration back (now)")
        parser.add_argument("--agent", help="an agent id, or a name (any agent of it)")
        parser.add_argument("--backend", help="backend name")
        parser.add_argument("--model", help="model name")
        parser.add_argument(
            "--refresh", action="store_true", help="count the calls not rolled up yet first"
        )
        parser.add_argument("--json", action="store_true", help="print the API's answer")

    def handle(self, *args: Any, **options: Any) -> None:
        with service_errors():
            query = UsageQuery.parse({**options, "group_by": options["by"]})
        if options["refresh"]:
            usage_rollup()
        report = usage_report(query)
        if options["json"]:
            self.stdout.write(as_json(report))
            return
        self.stdout.write(usage_table(report))


def _metrics(row: dict[str, Any]) -> list[Any]:
    cost = row["cost_usd"]
    if row["cost_unknown_calls"]:
        cost = f"{cost} +{row['cost_unknown_calls']} unknown"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    return [
        row["calls"], row["errors"], row["refusals"], row["input_tokens"], row["output_tokens"],
        row["cache_read_tokens"], row["cache_write_tokens"], cost,
        f"{ms(row['ttfb_p50_ms'])}/{ms(row['ttfb_p95_ms'])}",
    ]  # fmt: skip


def usage_table(report: dict[str, Any]) -> str:
    """The groups, then a TOTAL line; agents by name, an unenrolled one marked with its id."""
    group_by: list[str] = report["group_by"]
    headers = [name.upper() for name in group_by] + METRIC_HEADERS
    rows = []
    for group in report["groups"]:
        keys = [agent_label(group) if name == "agent" else group[name] for name in group_by]
        rows.append(keys + _metrics(group))
    rows.append(["TOTAL"] + [""] * (len(group_by) - 1) + _metrics(report["totals"]))
    if not group_by:
        headers = ["", *METRIC_HEADERS]
    span = f"{report['since']} to {report['until']} (UTC)"
    return f"{span}\n{table(rows, headers)}"
