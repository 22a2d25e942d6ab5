"""`manage.py token ls [--agent] [--backend] [--all] | revoke ID`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from broker.management.commands._output import service_errors, table
from broker.models import TokenState
from broker.selectors.tokens import tokens_list
from broker.services.tokens import token_get, token_revoke


class Command(BaseCommand):
    help = "List and revoke agents' crd_ tokens."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        ls = sub.add_parser("ls", help="live tokens (with --all: expired and revoked too)")
        ls.add_argument("--agent")
        ls.add_argument("--backend")
        ls.add_argument("--all", action="store_true")
        revoke = sub.add_parser("revoke", help="revoke a token at once")
        revoke.add_argument("id")

    def handle(self, *args: Any, **options: Any) -> None:
        with service_errors():
            getattr(self, f"do_{options['action']}")(**options)

    def do_ls(self, **options: Any) -> None:
        now = timezone.now()
        tokens = tokens_list(
            agent_name=options["agent"],
            backend_name=options["backend"],
            state=None if options["all"] else TokenState.LIVE,
        )
        rows = [
            (str(t.pk), t.agent.name, t.backend.name, f"{t.display_prefix}…", t.state(now),
             f"{t.expires_at:%Y-%m-%d %H:%M:%S}")
            for t in tokens
        ]  # fmt: skip
        headers = ["ID", "AGENT", "BACKEND", "PREFIX", "STATE", "EXPIRES"]
        self.stdout.write(table(rows, headers) if rows else "no tokens")

    def do_revoke(self, **options: Any) -> None:
        token = token_revoke(token=token_get(token_id=options["id"]))
        self.stdout.write(
            f"revoked {token.display_prefix}… ({token.agent.name}, {token.backend.name})"
        )
