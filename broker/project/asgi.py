"""ASGI entry point: the proxy on its own, other HTTP through Django, websockets through
Channels, and a lifespan that drains the audit queue on shutdown."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from django.core.asgi import get_asgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.project.settings")

# Django must be set up before anything imports models (consumers, routing).
django_application = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from audit.recorder import audit_flush  # noqa: E402
from audit.routing import SameOriginOnly, websocket_urlpatterns  # noqa: E402
from broker.infra.metrics import metrics_process_exit  # noqa: E402
from broker.runtime.http_timeouts import body_read_timeout  # noqa: E402
from keybroker.wire import is_proxy_path  # noqa: E402
from proxy.app import proxy_application  # noqa: E402
from proxy.upstream import upstream_close  # noqa: E402

GIL_SWITCH_SECONDS = 0.0005

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

django_and_channels = ProtocolTypeRouter(
    {
        # The admin's CSS and JS are served by Django itself, so `make run` needs no web
        # server in front; only paths under STATIC_URL take this branch.
        "http": ASGIStaticFilesHandler(django_application),
        # Origin must be the broker's own, scheme, host and port (issue 19, item 7).
        "websocket": SameOriginOnly(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            proxy_application.startup()
            # The URLconf (and the views, DRF and drf-spectacular it imports) would otherwise
            # load on the first page's request, after the freeze below.
            get_resolver().url_patterns  # noqa: B018
            # Everything loaded so far lives as long as the process: out of the collector's
            # sight, a full collection no longer walks Django's ~150k objects, which stalled
            # every open call for ~100 ms several times a minute under load (issue 13).
            gc.freeze()
            # A thread that takes the GIL (the audit writer's batch, a database call) keeps
            # it for up to this long while the event loop, with every call in flight, waits;
            # Python's default is 5 ms.
            sys.setswitchinterval(GIL_SWITCH_SECONDS)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await proxy_application.shutdown()
            await audit_flush()
            await upstream_close()
            metrics_process_exit()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def route(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http" and is_proxy_path(scope["path"]):
        await proxy_application(scope, receive, send)
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await django_and_channels(scope, receive, send)


# Every HTTP request, the proxy's included: a body that stalls ends in 408 (issue 19, item 14).
application = body_read_timeout(route)
