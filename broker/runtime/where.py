"""Where this process's settings and services come from: the .env file manage.py reads,
and which database and Redis it uses, in one line for an operator (a shell that lacks
DATABASE_URL must not quietly work on the default SQLite file; issue 20, item 8)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

# The file env_file_load read in this process, for `serve` to name in its first lines.
env_file_read: Path | None = None


def env_file_load(cwd: Path) -> Path | None:
    """Read ``KEYBROKER_ENV_FILE``, else ``.env`` in ``cwd`` if there is one, into the
    environment; variables already set win over the file's. The file read, when it set or
    could have set anything; None otherwise."""
    from dotenv import dotenv_values

    named = os.environ.get("KEYBROKER_ENV_FILE")
    path = Path(named).expanduser() if named else cwd / ".env"
    if named and not path.is_file() and str(path) != os.devnull:
        raise ImproperlyConfigured(f"KEYBROKER_ENV_FILE names {path}, which is not a file")
    if not path.is_file():
        return None
    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ImproperlyConfigured(f"cannot read {path} ({type(exc).__name__})") from None
    for name, value in values.items():
        if value is not None:
            os.environ.setdefault(name, value)
    global env_file_read
    env_file_read = path if values else None
    return env_file_read


def _database() -> str:
    db = settings.DATABASES["default"]
    engine = str(db["ENGINE"]).rsplit(".", 1)[-1]
    if engine.startswith("sqlite"):
        fallback = "" if os.environ.get("DATABASE_URL") else " (DATABASE_URL is not set)"
        return f"SQLite {db['NAME']}{fallback}"
    user = f"{db['USER']}@" if db.get("USER") else ""
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"{engine} {user}{db.get('HOST') or 'localhost'}{port}/{db['NAME']}"


def _redis() -> str:
    if settings.REDIS_EMBEDDED:
        return f"the embedded one on {settings.REDIS_SOCKET} (REDIS_URL is not set)"
    parts = urlsplit(settings.REDIS_URL)
    # The password (redis://:PASSWORD@host or user:PASSWORD@host) never reaches a log.
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username if parts.username and parts.password is not None else ""
    netloc = f"{user}@{host}" if user else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def where() -> str:
    """``database: …; redis: …`` (and the .env file read), never a password."""
    read = f"; settings from {env_file_read}" if env_file_read is not None else ""
    return f"database: {_database()}; redis: {_redis()}{read}"
