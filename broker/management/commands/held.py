"""`manage.py held ls|approve|deny`: calls held for a person's approval (a grant's hold)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from broker.management.commands._output import as_json, service_errors, table
from broker.selectors.held import held_calls_waiting
from broker.services.held import held_call_decide


class Command(BaseCommand):
    help = "Calls held for approval: list them, approve or deny one."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        ls = sub.add_parser("ls", help="calls waiting for a decision, in every process")
        ls.add_argument("--json", action="store_true")
        approve = sub.add_parser("approve", help="let a held call go upstream as it was sent")
        approve.add_argument("id")
        deny = sub.add_parser("deny", help="answer a held call with a 403")
        deny.add_argument("id")
        deny.add_argument("--reason", default="", help="shown to the agent")

    def handle(self, *args: Any, **options: Any) -> None:
        with service_errors():
            getattr(self, f"do_{options['action']}")(**options)

    def do_ls(self, **options: Any) -> None:
        calls = [call.json() for call in held_calls_waiting()]
        if options["json"]:
            self.stdout.write(as_json(calls))
            return
        if not calls:
            self.stdout.write("no call is held")
            return
        rows = [
            (c["id"], c["agent"], c["backend"], f"{c['method']} {c['path']}", c["model"] or "-",
             "-" if c["max_tokens"] is None else str(c["max_tokens"]), c["rule"],
             c["deadline"][:19].replace("T", " "))
            for c in calls
        ]  # fmt: skip
        headers = ["ID", "AGENT", "BACKEND", "CALL", "MODEL", "MAX TOKENS", "RULE", "UNTIL (UTC)"]
        self.stdout.write(table(rows, headers))

    def do_approve(self, **options: Any) -> None:
        call = held_call_decide(held_id=options["id"], approve=True, by=None)
        self.stdout.write(f"approved {call.id}: {call.agent}'s {call.method} {call.path} goes on")

    def do_deny(self, **options: Any) -> None:
        call = held_call_decide(
            held_id=options["id"], approve=False, by=None, reason=options["reason"]
        )
        self.stdout.write(f"denied {call.id}: {call.agent}'s {call.method} {call.path}")
