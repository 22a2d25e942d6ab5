"""Test settings: the real settings module, pointed at a throwaway data directory."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Never touch a developer's ./var: keys, SQLite and the embedded Redis socket go here.
_data_dir = tempfile.mkdtemp(prefix="kbtest-")
atexit.register(shutil.rmtree, _data_dir, ignore_errors=True)
os.environ["KEYBROKER_DATA_DIR"] = _data_dir
# Several runs may share one external Redis (CI, a developer's): keep their keys apart.
os.environ.setdefault("KEYBROKER_REDIS_PREFIX", f"kbtest{os.getpid()}")

from broker.project.settings import *  # noqa: E402, F403

# A file, not SQLite's in-memory default, so that a second server process (started by a
# test) shares the test database; PostgreSQL test databases are shared anyway.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(_data_dir, "test.sqlite3")}  # noqa: F405

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast, tests only
