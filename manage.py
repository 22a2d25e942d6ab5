#!/usr/bin/env python
from __future__ import annotations

import os
import sys
from pathlib import Path

# Commands that touch no database, and `serve`, which says where it is itself once its
# own checks passed.
QUIET = {"help", "version", "serve", "check", "makemigrations", "--help", "-h", "--version"}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.project.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        from broker.runtime.where import env_file_load, where

        # Before the settings are read: a .env (or KEYBROKER_ENV_FILE) fills in what the
        # environment leaves unset.
        env_file_load(Path.cwd())
        if len(sys.argv) > 1 and not QUIET & set(sys.argv[1:]):
            import django

            django.setup()
            sys.stderr.write(f"keybroker: {where()}\n")
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # A configuration mistake deserves one line that names it, not a traceback.
        sys.exit(f"keybroker: configuration error: {exc}")


if __name__ == "__main__":
    main()
