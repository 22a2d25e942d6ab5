"""A webhook receiver on a real socket, for the alert tests: it keeps every request and
answers 500 to the first ``failures`` of them, 200 after."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import served
from tests.fake_anthropic import Receive, Scope, SeenRequest, Send, received


class Receiver:
    def __init__(self) -> None:
        self.seen: list[SeenRequest] = []
        self.failures = 0
        self.url = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen = await received(scope, receive)
        self.seen.append(seen)
        status = 500 if len(self.seen) <= self.failures else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"thanks"})

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(seen.body) for seen in self.seen]


def signature_valid(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
    """Verifies ``X-Keybroker-Signature`` as docs/alerts.md tells a receiver to."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return (
        hmac.compare_digest(expected.hexdigest(), fields["v1"])
        and abs(time.time() - timestamp) <= tolerance
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    with served(receiver) as receiver.url:
        yield receiver
