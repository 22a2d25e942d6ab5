"""The websocket routes, and the guard in front of them: the browser's ``Origin`` must be
the broker's own, scheme, host and port (issue 19, item 7)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.urls import URLPattern, path

from audit.consumers import ActivityConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/activity/", ActivityConsumer.as_asgi()),
]

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) origin, default ports made explicit; None for
    anything else (``null``, other schemes, a path, junk)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in {"", "/"} or parts.query or parts.fragment or parts.username:
        return None
    return parts.scheme, parts.hostname.lower().rstrip("."), port or DEFAULT_PORTS[parts.scheme]


def allowed_origins(scope: Scope) -> set[tuple[str, str, int]]:
    """PUBLIC_URL, each exact CSRF_TRUSTED_ORIGINS entry, and the socket's own origin (the
    scheme it came in on and its Host header, when that host is in ALLOWED_HOSTS): the same
    origins Django's CSRF check accepts, minus wildcard entries."""
    candidates = [settings.PUBLIC_URL]
    candidates += [entry for entry in settings.CSRF_TRUSTED_ORIGINS if "*" not in entry]
    headers = dict(scope.get("headers") or [])
    host = headers.get(b"host", b"").decode("latin-1")
    domain, _port = split_domain_port(host)
    if domain and validate_host(domain, settings.ALLOWED_HOSTS):
        scheme = "https" if scope.get("scheme") == "wss" else "http"
        candidates.append(f"{scheme}://{host}")
    return {key for key in map(origin_key, candidates) if key is not None}


def origin_allowed(scope: Scope) -> bool:
    origins = [value for name, value in scope.get("headers") or [] if name == b"origin"]
    if len(origins) != 1:  # browsers always send one on a websocket; none or two: refused
        return False
    key = origin_key(origins[0].decode("latin-1"))
    return key is not None and key in allowed_origins(scope)


class SameOriginOnly:
    """Refuses (HTTP 403 at the handshake) a websocket whose Origin is not exactly one of
    :func:`allowed_origins`. Channels' AllowedHostsOriginValidator compared the host only,
    so a page on another port or scheme of the same host could read the feed with the
    admin's cookie."""

    def __init__(self, application: ASGIApp) -> None:
        self.application = application

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and not origin_allowed(scope):
            denier = WebsocketDenier()
            await denier(scope, receive, send)
            return
        await self.application(scope, receive, send)
