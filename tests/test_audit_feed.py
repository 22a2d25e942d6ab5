"""The live feed: /ws/activity/ over the Redis channel layer, for staff only.

Every wait below is a generous timeout (so a loaded CI machine does not fail a test); the
design keeps the real delay near the recorder's 0.2 s flush interval, and bench/audit_recorder.py
measures it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connections
from django.test import Client
from websockets.asyncio.client import connect

from audit.services import audit_record
from broker.asgi import application
from broker.services.backends import backend_add
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key
from tests.proxy_cast import Proxied

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 10.0  # seconds: a ceiling against hangs, not a latency requirement
ORIGIN = "http://127.0.0.1"
MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 8, "system": "be brief",
           "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip


@pytest.fixture(autouse=True)
async def close_executor_connections() -> AsyncIterator[None]:
    """ORM calls from an async test run in asgiref's executor thread, whose connection would
    otherwise outlive the test database (PostgreSQL then refuses to drop it)."""
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture(autouse=True)
def fresh_channel_layer() -> Iterator[None]:
    """A channel layer object of each test's own.

    channels-redis lets one layer object receive on one event loop at a time. Production has
    one loop per process; here the live server's loop (a thread) and each test's loop share a
    process, and a socket the server is still closing from the previous test would hold it.
    """
    fresh = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    old = channel_layers.set(DEFAULT_CHANNEL_LAYER, fresh)
    yield
    if old is not None:
        channel_layers.set(DEFAULT_CHANNEL_LAYER, old)


def session_cookie(user: AbstractBaseUser) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def communicator(cookie: str | None, origin: str = ORIGIN) -> WebsocketCommunicator:
    headers = [(b"host", b"127.0.0.1"), (b"origin", origin.encode())]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, "/ws/activity/", headers=headers)


@pytest.fixture
async def staff_socket(alice: AbstractBaseUser) -> AsyncIterator[WebsocketCommunicator]:
    socket = communicator(await sync_to_async(session_cookie)(alice))
    connected, _ = await socket.connect(timeout=WAIT)
    assert connected
    yield socket
    await socket.disconnect()


async def next_event(socket: WebsocketCommunicator) -> dict[str, Any]:
    message = await socket.receive_json_from(timeout=WAIT)
    assert message["type"] == "audit.event", message
    return dict(message["event"])


async def test_a_staff_socket_receives_a_proxied_call_as_it_happens(
    proxied: Proxied, staff_socket: WebsocketCommunicator
) -> None:
    async with httpx.AsyncClient(base_url=proxied.base_url) as http:
        response = await http.post(
            "/v1/messages", json=MESSAGE, headers={"x-api-key": proxied.token}
        )
    assert response.status_code == 200
    event = await next_event(staff_socket)
    assert (event["action"], event["agent"], event["backend"]) == (
        "proxy.request",
        "bob",
        "anthropic",
    )
    assert (event["model"], event["status"], event["system_prompt"]) == (
        "claude-haiku-4-5",
        200,
        True,
    )
    assert (event["input_tokens"], event["output_tokens"], event["streamed"]) == (12, 6, False)
    assert event["request_id"] == response.headers["request-id"]
    assert isinstance(event["id"], int)
    assert event["created_at"]
    assert proxied.token not in json.dumps(event)


async def test_an_admin_action_arrives_after_it_commits(
    staff_socket: WebsocketCommunicator, fake_anthropic: FakeAnthropic
) -> None:
    await sync_to_async(backend_add)(
        name="anthropic", secret=api_key(), base_url=fake_anthropic.url
    )
    event = await next_event(staff_socket)
    assert (event["action"], event["backend"], event["actor_type"]) == (
        "backend.added",
        "anthropic",
        "system",
    )
    assert event["detail"]["fingerprint"].startswith("sk-ant-api03-…")


async def test_filters_chosen_over_the_socket_narrow_the_feed(
    staff_socket: WebsocketCommunicator,
) -> None:
    await staff_socket.send_json_to({"type": "filter", "agent": "", "action": "backend.*"})
    assert await staff_socket.receive_json_from(timeout=WAIT) == {
        "type": "filter", "agent": "", "backend": "", "action": "backend.*",
    }  # fmt: skip
    record = sync_to_async(audit_record)
    await record(action="auth.failed", method="vend_token")
    await record(action="backend.rotated", backend="one")
    await record(action="token.issued", backend="one")
    await record(action="backend.removed", backend="two")
    # Published in this order: had the filter let anything else through, it would come first.
    assert (await next_event(staff_socket))["action"] == "backend.rotated"
    assert (await next_event(staff_socket))["action"] == "backend.removed"


async def test_a_frame_the_feed_cannot_use_gets_an_error_and_the_socket_stays(
    staff_socket: WebsocketCommunicator,
) -> None:
    await staff_socket.send_to(text_data="not json")
    assert (await staff_socket.receive_json_from(timeout=WAIT))["type"] == "error"
    await staff_socket.send_json_to({"type": "filter", "agent": 7, "colour": "red"})
    error = await staff_socket.receive_json_from(timeout=WAIT)
    assert error == {"type": "error", "message": "unusable filter field(s): colour, agent"}
    await sync_to_async(audit_record)(action="backend.added", backend="still-here")
    assert (await next_event(staff_socket))["backend"] == "still-here"


async def test_anonymous_and_non_staff_sockets_are_refused() -> None:
    charlie = await sync_to_async(get_user_model().objects.create_user)(
        "charlie", password="charlie-pw-123"
    )
    for cookie in [None, "sessionid=forged", await sync_to_async(session_cookie)(charlie)]:
        socket = communicator(cookie)
        connected, _ = await socket.connect(timeout=WAIT)
        assert not connected, cookie
        await socket.disconnect()


async def test_a_socket_from_a_foreign_origin_is_refused_even_with_a_staff_session(
    alice: AbstractBaseUser,
) -> None:
    cookie = await sync_to_async(session_cookie)(alice)
    for origin in ["https://evil.example", "http://127.0.0.1.evil.example", "null"]:
        socket = communicator(cookie, origin=origin)
        connected, _ = await socket.connect(timeout=WAIT)
        assert not connected, origin
        await socket.disconnect()


async def test_a_real_websocket_client_through_uvicorn_receives_the_call(
    proxied: Proxied, live_url: str, alice: AbstractBaseUser
) -> None:
    cookie = await sync_to_async(session_cookie)(alice)
    ws_url = live_url.replace("http://", "ws://") + "/ws/activity/"
    async with connect(
        ws_url,
        origin=live_url,
        additional_headers={"Cookie": cookie},
        proxy=None,  # type: ignore[arg-type]
    ) as socket:
        await socket.send(json.dumps({"type": "filter", "action": "proxy.request"}))
        assert json.loads(await asyncio.wait_for(socket.recv(), WAIT))["type"] == "filter"
        async with httpx.AsyncClient(base_url=proxied.base_url) as http:
            response = await http.post(
                "/v1/messages",
                json={**MESSAGE, "stream": True},
                headers={"x-api-key": proxied.token},
            )
        assert response.status_code == 200
        message = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
    assert message["type"] == "audit.event"
    event = message["event"]
    assert (event["action"], event["streamed"], event["output_tokens"]) == (
        "proxy.request",
        True,
        10,
    )
    assert event["token_id"] == proxied.token_id


async def test_a_real_websocket_client_is_refused_without_a_session_or_from_elsewhere(
    live_url: str, alice: AbstractBaseUser
) -> None:
    cookie = await sync_to_async(session_cookie)(alice)
    ws_url = live_url.replace("http://", "ws://") + "/ws/activity/"
    for origin, headers in [(live_url, {}), ("https://evil.example", {"Cookie": cookie})]:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(ws_url, origin=origin, additional_headers=headers, proxy=None):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403


@pytest.mark.slow
async def test_an_event_recorded_inside_a_celery_worker_arrives(
    celery_worker: subprocess.Popen[bytes],
    staff_socket: WebsocketCommunicator,
    fake_anthropic: FakeAnthropic,
) -> None:
    key = api_key(tail="W0rk")
    fake_anthropic.valid_keys.add(key)
    await staff_socket.send_json_to({"type": "filter", "action": "backend.validated"})
    assert (await staff_socket.receive_json_from(timeout=WAIT))["type"] == "filter"
    # Adding queues a validation task; only the worker runs it (this process never does).
    await sync_to_async(backend_add)(name="anthropic", secret=key, base_url=fake_anthropic.url)
    event = await next_event(staff_socket)
    assert (event["action"], event["backend"], event["detail"]) == (
        "backend.validated",
        "anthropic",
        {"state": "valid", "fingerprint": "sk-ant-api03-…W0rk"},  # the key checked (issue 15)
    )
    assert fake_anthropic.requests[-1].headers["x-api-key"] == key


def _staff_with(*codenames: str) -> AbstractBaseUser:
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user(
        f"staff-{'-'.join(codenames) or 'none'}", password="staff-pw-123", is_staff=True
    )
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


async def test_staff_without_view_auditevent_get_neither_the_feed_nor_the_page() -> None:
    """The admin asks for view_auditevent to show the trail; the feed and page ask too."""
    agents_only = await sync_to_async(_staff_with)("view_agent")
    auditor = await sync_to_async(_staff_with)("view_auditevent")
    for user, allowed in ((agents_only, False), (auditor, True)):
        cookie = await sync_to_async(session_cookie)(user)
        socket = communicator(cookie)
        connected, _ = await socket.connect(timeout=WAIT)
        assert connected is allowed, user
        await socket.disconnect()

        def page(user: AbstractBaseUser = user) -> int:
            client = Client()
            client.force_login(user)
            return client.get("/activity/").status_code

        assert await sync_to_async(page)() == (200 if allowed else 403)
