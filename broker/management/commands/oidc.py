"""`manage.py oidc rotate-key`: a new JWT signing key; the old one stays published."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from broker.services.oidc import signing_key_rotate


class Command(BaseCommand):
    help = "Manage keybroker's OIDC issuer."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("rotate-key", help="sign new JWTs with a new key")

    def handle(self, *args: Any, **options: Any) -> None:
        key = signing_key_rotate()
        self.stdout.write(
            f"new signing key {key.kid}; the previous one stays in the JWKS for "
            f"{settings.OIDC_TOKEN_LIFETIME_SECONDS}s, until every JWT it signed has expired"
        )
