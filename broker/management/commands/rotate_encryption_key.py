"""`manage.py rotate_encryption_key`: replace the key that encrypts stored upstream secrets."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from broker.services.crypto import encryption_key_rotate


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored secret under a new encryption key. With the generated key "
        "in the data dir, a new one is generated and replaces it; with KEYBROKER_ENCRYPTION_KEY "
        "set, give the new key with --new-key-file and deploy it yourself. Restart keybroker "
        "afterwards so that every process loads the new key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--new-key-file", type=Path, help="a file holding the new key")

    def handle(self, *args: Any, **options: Any) -> None:
        key_path: Path | None = settings.ENCRYPTION_KEY_PATH
        new_key_file: Path | None = options["new_key_file"]
        if new_key_file is not None:
            try:
                new_key = new_key_file.read_text().strip()
            except OSError as exc:
                raise CommandError(f"cannot read {new_key_file}: {exc.strerror}") from None
        elif key_path is None:
            raise CommandError(
                "KEYBROKER_ENCRYPTION_KEY comes from the environment: put the new key in a file "
                "and pass --new-key-file"
            )
        else:
            new_key = secrets.token_urlsafe(48)
        staged = None
        if key_path is not None:
            # Stage the new key on disk first: if the process dies after the database commit,
            # the key that decrypts the data is still there.
            staged = key_path.with_name(key_path.name + ".new")
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(new_key + "\n")
        try:
            count = encryption_key_rotate(new_key=new_key)
        except ValueError as exc:
            if staged is not None:
                staged.unlink()
            raise CommandError(str(exc)) from None
        if staged is not None and key_path is not None:
            os.replace(staged, key_path)
            self.stdout.write(f"re-encrypted {count} secret(s); the new key is in {key_path}")
        else:
            self.stdout.write(
                f"re-encrypted {count} secret(s); now set KEYBROKER_ENCRYPTION_KEY to the new key "
                "on every machine"
            )
        self.stdout.write("restart keybroker so every process uses the new key")
