"""Alerts as production sends them (issue 17): an enrollment through the real API on a real
socket, the delivery queued to Redis, sent by a real Celery worker process to a webhook
receiver on a real socket; a receiver that answers 500 once gets the delivery again; the
recorder spilling reaches the receiver too."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connections

from audit import alerts, recorder
from audit.models import DeliveryState, NotificationDelivery
from audit.recorder import audit_enqueue
from tests.servers import celery_worker_running, process_env
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver, signature_valid

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Generous for a loaded 2-core machine; the delivery itself takes milliseconds.
WAIT = 30


@pytest.fixture
def quick_worker() -> Iterator[subprocess.Popen[bytes]]:
    """A real worker whose retries wait 1 s, then 2 s, … (KEYBROKER_ALERT_RETRY_BASE)."""
    with celery_worker_running(process_env(KEYBROKER_ALERT_RETRY_BASE="1")) as worker:
        yield worker


def add_channel(live_url: str, token: str, receiver: Receiver, events: list[str]) -> str:
    created = httpx.post(
        f"{live_url}/v1/admin/notifications/",
        json={"url": f"{receiver.url}/hook", "events": events},
        headers={"authorization": f"Bearer {token}"},
    )
    assert created.status_code == 201, created.text
    secret: str = created.json()["signing_secret"]
    return secret


@pytest.fixture
def admin_token(alice: Any) -> str:
    from broker.services.admin_tokens import admintoken_create

    return admintoken_create(name="ci", username="alice").plaintext


def enroll_over_http(live_url: str, name: str) -> dict[str, Any]:
    response = httpx.post(f"{live_url}/v1/enroll", json={"name": name, "scopes": ["anthropic"]})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_webhook_sees_an_enrollment_within_seconds_with_a_valid_signature(
    live_url: str,
    admin_token: str,
    anthropic: Any,
    receiver: Receiver,
    quick_worker: subprocess.Popen[bytes],
) -> None:
    secret = add_channel(live_url, admin_token, receiver, ["agent.waiting"])
    enrolled = enroll_over_http(live_url, "ci-runner")

    wait_until(lambda: receiver.seen, timeout=WAIT, what="the webhook to receive the alert")
    (seen,) = receiver.seen
    assert signature_valid(secret, seen.headers["x-keybroker-signature"], seen.body)
    body = json.loads(seen.body)
    assert (body["event"], body["data"]["agent"]) == ("agent.waiting", "ci-runner")
    assert body["link"].endswith(f"/admin/broker/agent/{enrolled['id']}/change/")
    assert enrolled["vend_token"] not in seen.body.decode()
    delivery = NotificationDelivery.objects.get()
    wait_until(
        lambda: NotificationDelivery.objects.get().state == DeliveryState.DELIVERED,
        timeout=WAIT,
        what="the delivery to be logged as delivered",
    )
    assert str(delivery.pk) == body["id"]


def test_a_receiver_that_answers_500_once_gets_the_delivery_again(
    live_url: str,
    admin_token: str,
    anthropic: Any,
    receiver: Receiver,
    quick_worker: subprocess.Popen[bytes],
) -> None:
    receiver.failures = 1
    secret = add_channel(live_url, admin_token, receiver, ["agent.waiting"])
    enroll_over_http(live_url, "ci-runner")

    wait_until(lambda: len(receiver.seen) >= 2, timeout=WAIT, what="the retried delivery")
    first, second = receiver.seen
    assert first.body == second.body  # the same alert, with the same delivery id
    assert first.headers["x-keybroker-delivery"] == second.headers["x-keybroker-delivery"]
    for seen in (first, second):
        assert signature_valid(secret, seen.headers["x-keybroker-signature"], seen.body)

    def delivered() -> NotificationDelivery | None:
        delivery = NotificationDelivery.objects.get()
        return delivery if delivery.state == DeliveryState.DELIVERED else None

    delivery = wait_until(delivered, timeout=WAIT, what="the delivery logged as delivered")
    log = [(a.number, a.status, a.error) for a in delivery.attempt_log.all()]
    assert log == [(1, 500, "the receiver answered 500"), (2, 200, "")]
    assert delivery.attempts == 2
    assert len(receiver.seen) == 2


async def test_the_recorder_spilling_reaches_the_webhook(
    admin_token: str,
    receiver: Receiver,
    quick_worker: subprocess.Popen[bytes],
    tmp_path: Path,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asgiref.sync import sync_to_async

    from audit.channels import channel_create

    created = await sync_to_async(channel_create)(
        kind="webhook", url=f"{receiver.url}/hook", events=["audit.spilled"]
    )
    # This process's database is "down" (its writes fail); the worker's is not.
    settings.DATA_DIR = tmp_path

    async def down(batch: list[dict[str, Any]]) -> list[Any]:
        raise OSError("database down")

    monkeypatch.setattr(recorder, "_write_async", down)
    monkeypatch.setattr(recorder, "BUFFER_LIMIT", 2)
    monkeypatch.setattr(alerts, "_spill_notice", alerts._SpillNotice())
    try:
        for number in range(3):
            audit_enqueue(action="proxy.request", agent="bob", request_id=f"req_{number}")
        await sync_to_async(wait_until)(
            lambda: receiver.seen, timeout=WAIT, what="the spill alert at the webhook"
        )
    finally:
        state = recorder._recorders.pop()
        if state is not None and state.task is not None:
            state.task.cancel()
        # The executor thread's connection would outlive the test database otherwise.
        await sync_to_async(connections.close_all)()
    (seen,) = receiver.seen
    body = json.loads(seen.body)
    assert body["event"] == "audit.spilled"
    assert body["data"]["count"] == 1
    assert body["data"]["path"] == str(tmp_path / "audit-spill.jsonl")
    assert body["text"].startswith("The audit recorder spilled 1 event(s) to ")
    assert signature_valid(created.signing_secret, seen.headers["x-keybroker-signature"], seen.body)
