"""`manage.py token ls [--agent] [--backend] [--all] | revoke ID`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from broker.management.commands._output import service_errors, table
from broker.models import Token
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
        tokens = Token.objects.select_related("agent", "backend")
        if not options["all"]:
            tokens = tokens.filter(revoked_at__isnull=True, expires_at__gt=now)
        if options["agent"]:
            tokens = tokens.filter(agent__name=options["agent"])
        if options["backend"]:
            tokens = tokens.filter(backend__name=options["backend"])
        rows = [
            (str(t.pk), t.agent.name, t.backend.name, f"{t.display_prefix}…",
             "revoked" if t.revoked_at else ("live" if t.expires_at > now else "expired"),
             f"{t.expires_at:%Y-%m-%d %H:%M:%S}")
            for t in tokens[:1000]
        ]  # fmt: skip
        headers = ["ID", "AGENT", "BACKEND", "PREFIX", "STATE", "EXPIRES"]
        self.stdout.write(table(rows, headers) if rows else "no tokens")

    def do_revoke(self, **options: Any) -> None:
        token = token_revoke(token=token_get(token_id=options["id"]))
        self.stdout.write(
            f"revoked {token.display_prefix}… ({token.agent.name}, {token.backend.name})"
        )
