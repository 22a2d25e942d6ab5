"""`manage.py serve`: the whole broker in one command (Redis, uvicorn, Celery worker + beat)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from broker.runtime.serve import ServeError, serve


class Command(BaseCommand):
    help = (
        "Run keybroker: Redis (embedded unless REDIS_URL is set), uvicorn, and a Celery "
        "worker with beat."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--workers",
            type=int,
            default=None,
            help="uvicorn worker processes (default KEYBROKER_WEB_WORKERS: one per core)",
        )
        parser.add_argument(
            "--ensure-admin",
            action="store_true",
            help="create the first admin once everything is up, as ensure_admin does, and "
            "print a generated password last, where it does not scroll away (make run)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        def say(text: str) -> None:
            self.stdout.write(text)
            self.stdout.flush()

        def first_admin() -> None:
            call_command("ensure_admin", stdout=self.stdout)
            self.stdout.flush()

        try:
            serve(
                workers=options["workers"] or settings.WEB_WORKERS,
                say=say,
                log=lambda line: self.stderr.write(f"keybroker: {line}"),
                when_up=first_admin if options["ensure_admin"] else None,
            )
        except ServeError as exc:
            raise CommandError(str(exc)) from None
