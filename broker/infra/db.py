"""Database work from async code, in worker threads that behave like a request cycle."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

P = ParamSpec("P")
R = TypeVar("R")


def db_call(function: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run ``function`` in a worker thread, in parallel with other calls.

    Like a Django request, each call starts and ends by closing connections that are
    obsolete (CONN_MAX_AGE) or broken, so a restarted database costs one failed call, not
    a thread stuck with a dead connection, and idle threads hold no connection.
    """

    @functools.wraps(function)
    def cycle(*args: P.args, **kwargs: P.kwargs) -> R:
        close_old_connections()
        try:
            return function(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(cycle, thread_sensitive=False)
