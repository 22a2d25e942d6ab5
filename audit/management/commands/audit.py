"""`manage.py audit [--agent] [--agent-id] [--backend] [--action] [--status] [--since]
[--until] [--limit] [--json]`, `manage.py audit verify [--since]` and
`manage.py audit export --format jsonl|cef [--since] [--until]`."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.chain import chain_verify
from audit.events import event_json
from audit.export import FORMATS, audit_export
from audit.models import AuditEvent
from audit.selectors import AuditFilter, audit_events
from broker.management.commands._output import service_errors, table

MAX_LIMIT = 100_000


class Command(BaseCommand):
    help = "Show the audit trail, newest first (metadata only: never content or secrets)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--agent", help="agent name")
        parser.add_argument("--agent-id", help="agent id (names are reused after an unenroll)")
        parser.add_argument("--backend", help="backend name")
        parser.add_argument("--action", help="comma-separated; token.* for a family")
        parser.add_argument("--status", help="status of a proxied call (429) or a class (4xx)")
        parser.add_argument("--since", help="date, ISO 8601 time or a duration back: 2h, 7d")
        parser.add_argument("--until", help="date, ISO 8601 time or a duration back")
        parser.add_argument("--limit", type=int, default=50, help="at most this many (50)")
        parser.add_argument("--json", action="store_true", help="one JSON object per line")
        # Without a subcommand the command lists, as it always has.
        commands = parser.add_subparsers(dest="subcommand", metavar="{verify,export}")
        verify = commands.add_parser(
            "verify", help="check the hash chain: exit 1 naming the first event that breaks it"
        )
        verify.add_argument("--since", help="from this time on (date, ISO 8601 or 2h, 7d)")
        export = commands.add_parser(
            "export", help="stream every event in write order for a SIEM (JSON lines or CEF)"
        )
        export.add_argument("--format", choices=FORMATS, default="jsonl")
        export.add_argument("--since", help="date, ISO 8601 time or a duration back: 2h, 7d")
        export.add_argument("--until", help="date, ISO 8601 time or a duration back")

    def handle(self, *args: Any, **options: Any) -> None:
        if options.get("subcommand") == "verify":
            self.verify(options)
            return
        if options.get("subcommand") == "export":
            with service_errors():
                times = AuditFilter.parse(options)
            for line in audit_export(
                format=options["format"], since=times.since, until=times.until
            ):
                self.stdout.write(line)
            return
        if not 1 <= options["limit"] <= MAX_LIMIT:
            raise CommandError(f"--limit: 1 to {MAX_LIMIT}")
        with service_errors():
            audit_filter = AuditFilter.parse(options)
        events = list(audit_events(audit_filter)[: options["limit"]])
        if options["json"]:
            for event in events:
                self.stdout.write(json.dumps(event_json(event), default=str))
            return
        self.stdout.write(table([_row(e) for e in events], HEADERS) if events else "no events")

    def verify(self, options: dict[str, Any]) -> None:
        with service_errors():
            since = AuditFilter.parse({"since": options.get("since")}).since
        result = chain_verify(since=since)
        if not result.intact:
            for found in result.breaks:
                self.stderr.write(found.message)
            first = result.breaks[0]
            where = f"event {first.event_id}" if first.event_id is not None else "its end"
            raise CommandError(f"the audit chain is broken at {where}: {first.why}")
        span = (
            f"{result.checked} event(s), #{result.first_seq} to #{result.last_seq}"
            if result.checked
            else "no events to check"
        )
        after = (
            f", after the retention checkpoint at #{result.checkpoint}" if result.checkpoint else ""
        )
        self.stdout.write(f"audit chain intact: {span}{after}")


HEADERS = [
    "TIME", "ACTION", "ACTOR", "AGENT", "BACKEND", "MODEL", "STATUS", "TOKENS", "MS", "MESSAGE",
]  # fmt: skip


def _row(event: AuditEvent) -> list[Any]:
    tokens = (
        f"{event.input_tokens or 0}/{event.output_tokens or 0}"
        if event.input_tokens is not None or event.output_tokens is not None
        else ""
    )
    return [
        f"{event.created_at:%Y-%m-%d %H:%M:%S}",
        event.action,
        f"{event.actor_type}:{event.actor}" if event.actor else event.actor_type,
        event.agent,
        event.backend,
        event.model,
        event.status or "",
        tokens,
        f"{event.duration_ms:.0f}" if event.duration_ms is not None else "",
        (event.message or event.policy_reason)[:80],
    ]
