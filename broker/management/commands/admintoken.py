"""`manage.py admintoken create|ls|revoke`: tokens for the /v1/admin/ REST API."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from broker.management.commands._output import service_errors, table
from broker.models import AdminToken
from broker.services.admin_tokens import admintoken_create, admintoken_revoke


class Command(BaseCommand):
    help = "Manage admin API tokens (cka_…), each acting as a staff user."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="create a token; it is printed once")
        create.add_argument("name")
        create.add_argument("--user", default="admin", help="the staff user it acts as")
        sub.add_parser("ls", help="list tokens (never their secrets)")
        revoke = sub.add_parser("revoke", help="revoke a token at once")
        revoke.add_argument("id", type=int)

    def handle(self, *args: Any, **options: Any) -> None:
        with service_errors():
            if options["action"] == "create":
                issued = admintoken_create(name=options["name"], username=options["user"])
                self.stderr.write(
                    f"admin token {issued.token.pk} for {options['user']} (shown once):"
                )
                self.stdout.write(issued.plaintext)
            elif options["action"] == "ls":
                rows = [
                    (t.pk, t.name, t.user.get_username(), f"{t.display_prefix}…",
                     f"{t.created_at:%Y-%m-%d %H:%M}", "revoked" if t.revoked_at else "active")
                    for t in AdminToken.objects.select_related("user")
                ]  # fmt: skip
                headers = ["ID", "NAME", "USER", "PREFIX", "CREATED", "STATE"]
                self.stdout.write(table(rows, headers) if rows else "no admin tokens")
            else:
                token = admintoken_revoke(token_id=options["id"])
                self.stdout.write(f"revoked admin token {token.pk} ({token.display_prefix}…)")
