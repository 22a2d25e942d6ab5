"""The live feed's websocket takes only the broker's own Origin: scheme, host and port
(issue 19, item 7). Channels' AllowedHostsOriginValidator compared the host alone, so a page
on another port of the same host read the feed with the admin's cookie."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from django.contrib.auth.models import AbstractBaseUser
from django.db import connections
from django.test import Client, override_settings
from websockets.asyncio.client import connect

from audit.routing import origin_allowed, origin_key
from audit.services import audit_record

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 10.0


@pytest.fixture(autouse=True)
async def close_executor_connections() -> AsyncIterator[None]:
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture(autouse=True)
def fresh_channel_layer() -> Iterator[None]:
    """A layer object per test (see tests/test_audit_feed.py: one loop per layer object)."""
    fresh = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    old = channel_layers.set(DEFAULT_CHANNEL_LAYER, fresh)
    yield
    if old is not None:
        channel_layers.set(DEFAULT_CHANNEL_LAYER, old)


def session_cookie(user: AbstractBaseUser) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


async def handshake_status(ws_url: str, origin: str | None, cookie: str) -> int:
    """101 when the socket opened (and, to be sure, carried an event), else the refusal."""
    try:
        async with connect(
            ws_url,
            origin=origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": cookie},
            proxy=None,  # type: ignore[arg-type]
        ) as socket:
            await socket.send(json.dumps({"type": "filter", "action": "origin.probe"}))
            assert json.loads(await asyncio.wait_for(socket.recv(), WAIT))["type"] == "filter"
            await sync_to_async(audit_record)(action="origin.probe", message="probe")
            event = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
            assert event["event"]["action"] == "origin.probe"
            return 101
    except websockets.InvalidStatus as refused:
        return refused.response.status_code


def other_port(port: int) -> int:
    return port + 1 if port < 65535 else port - 1


async def test_only_the_exact_origin_opens_the_feed(live_url: str, alice: AbstractBaseUser) -> None:
    cookie = await sync_to_async(session_cookie)(alice)
    ws_url = live_url.replace("http://", "ws://") + "/ws/activity/"
    port = urlsplit(live_url).port
    assert port is not None
    assert await handshake_status(ws_url, live_url, cookie) == 101
    refused = [
        f"http://127.0.0.1:{other_port(port)}",  # another port on the same host
        "http://127.0.0.1:18700",
        f"https://127.0.0.1:{port}",  # another scheme
        f"http://localhost:{port}",  # another host name, even one in ALLOWED_HOSTS
        "http://localhost:9999",
        "http://127.0.0.1",  # port 80 is not this port
        "https://evil.example",
        "null",
        f"{live_url}/admin/",  # an origin has no path
        None,  # no Origin at all
    ]
    for origin in refused:
        assert await handshake_status(ws_url, origin, cookie) == 403, origin


async def test_the_public_url_and_trusted_origins_open_the_feed_and_nothing_near_them(
    live_url: str, alice: AbstractBaseUser
) -> None:
    """Behind a TLS proxy the browser's Origin is the public URL, not the socket's host."""
    cookie = await sync_to_async(session_cookie)(alice)
    ws_url = live_url.replace("http://", "ws://") + "/ws/activity/"
    with override_settings(
        PUBLIC_URL="https://keys.example.com",
        CSRF_TRUSTED_ORIGINS=["https://keys.example.com", "https://ops.example.com:8443"],
    ):
        for origin in [
            "https://keys.example.com",
            "https://KEYS.example.com:443",
            "https://ops.example.com:8443",
        ]:
            assert await handshake_status(ws_url, origin, cookie) == 101, origin
        for origin in [
            "http://keys.example.com",
            "https://keys.example.com:8443",
            "https://ops.example.com",
            "https://evil.keys.example.com",
        ]:
            assert await handshake_status(ws_url, origin, cookie) == 403, origin


def scope(origin: bytes | list[bytes], host: bytes = b"127.0.0.1:8400") -> dict[str, object]:
    origins = origin if isinstance(origin, list) else [origin]
    return {
        "type": "websocket",
        "scheme": "ws",
        "headers": [(b"host", host), *((b"origin", value) for value in origins)],
    }


@override_settings(PUBLIC_URL="http://127.0.0.1:8400", CSRF_TRUSTED_ORIGINS=[])
def test_origin_rules_without_a_server() -> None:
    assert origin_key("http://Example.COM") == ("http", "example.com", 80)
    assert origin_key("https://example.com:443") == ("https", "example.com", 443)
    assert origin_key("ftp://example.com") is None
    assert origin_key("http://user@example.com") is None
    assert origin_key("http://example.com:notaport") is None
    assert origin_allowed(scope(b"http://127.0.0.1:8400"))
    assert not origin_allowed(scope(b"http://127.0.0.1:8401"))
    # Two Origin headers are refused even when one of them is right.
    assert not origin_allowed(scope([b"http://127.0.0.1:8400", b"http://127.0.0.1:8401"]))
    # A Host outside ALLOWED_HOSTS does not make its own origin acceptable (DNS rebinding).
    rebinding = scope(b"http://attacker.example:8400", host=b"attacker.example:8400")
    assert not origin_allowed(rebinding)
