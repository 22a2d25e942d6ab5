"""Alerts (issue 17): channels over REST, which audit events become alerts, each channel's
shape (webhook, Slack, email), budgets crossing 80 and 100 % through real proxy calls, the
spike rule and bad input. Deliveries are tried here, in this process, by the same function
the Celery task calls; tests/test_alerts_worker.py sends them through a real worker."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from typing import Any

import anthropic
import pytest
from django.conf import settings
from django.core import mail
from django.db import connection
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent, DeliveryState, NotificationChannel, NotificationDelivery
from audit.notify import deliveries_requeue, delivery_attempt, retry_delay
from audit.spikes import spikes_check
from broker.infra.redis import redis_client
from broker.models import Agent
from broker.selectors.held import held_calls_waiting
from broker.services.backends import backend_add, backend_validate
from broker.services.held import held_call_decide
from tests.agents import as_agent, enroll, send
from tests.fake_anthropic import FakeAnthropic
from tests.keys import api_key
from tests.proxy_cast import Proxied, audit_drained
from tests.test_policy_proxy import HAIKU, HELLO, sdk, set_policy
from tests.test_policy_usd import spent, wait_until_spent
from tests.waiting import wait_until
from tests.webhook_receiver import Receiver, signature_valid

URL = "/v1/admin/notifications/"


def add_channel(admin_api: Client, **body: Any) -> dict[str, Any]:
    response = send(admin_api, "post", URL, body)
    assert response.status_code == 201, response.content
    created: dict[str, Any] = response.json()
    return created


def raw_channel_rows() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM audit_notificationchannel")
        return repr(cursor.fetchall())


def deliveries(event: str | None = None) -> list[NotificationDelivery]:
    found = NotificationDelivery.objects.order_by("created_at")
    return list(found.filter(event=event) if event else found)


def attempt_all() -> None:
    for delivery in deliveries():
        delivery_attempt(delivery_id=str(delivery.pk))


def try_now(delivery: NotificationDelivery) -> float | None:
    """The next try at once, as the task would run it once its backoff has passed."""
    NotificationDelivery.objects.filter(pk=delivery.pk).update(next_try_at=timezone.now())
    return delivery_attempt(delivery_id=str(delivery.pk))


# --- channels over REST ----------------------------------------------------------------------
@pytest.mark.django_db
def test_a_webhook_gets_a_signing_secret_shown_once_and_never_again(admin_api: Client) -> None:
    created = add_channel(
        admin_api,
        url="https://hooks.example.com/keybroker/Zq7T",
        events=["agent.waiting", "budget.100"],
    )
    secret = created["signing_secret"]
    assert secret.startswith("ckw_")
    assert len(secret) >= 4 + 43  # 32 random bytes
    assert created["target"] == "https://hooks.example.com/…Zq7T"
    assert created["signing_secret_hint"] == f"ckw_…{secret[-4:]}"
    listed = send(admin_api, "get", URL)
    shown = send(admin_api, "get", f"{URL}{created['id']}")
    for response in (listed, shown):
        assert response.status_code == 200
        assert secret not in response.content.decode()
        assert "keybroker/Zq7T" not in response.content.decode()
    assert shown.json()["events"] == ["agent.waiting", "budget.100"]
    # Stored encrypted: the columns hold neither the URL nor the secret.
    assert NotificationChannel.objects.get().signing_secret == secret
    assert secret not in raw_channel_rows()
    assert "keybroker/Zq7T" not in raw_channel_rows()
    event = AuditEvent.objects.get(action="alerts.channel_added")
    assert event.actor == "alice"
    assert event.detail["target"] == "https://hooks.example.com/…Zq7T"
    assert secret not in json.dumps(event.detail)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/x", "events": ["agent.waiting"]}, "url"),
        ({"url": "https://example.com/x", "events": ["agent.nope"]}, "events"),
        ({"url": "https://example.com/x", "events": []}, "events"),
        ({"url": "https://example.com/x", "events": ["spike"], "kind": "pager"}, "kind"),
        ({"url": "not-an-address", "events": ["spike"], "kind": "email"}, "url"),
        ({"url": "https://example.com/x", "events": ["spike"], "secret": "x"}, "secret"),
        ({"events": ["spike"]}, "url"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_creates_nothing(
    admin_api: Client, body: dict[str, Any], field: str
) -> None:
    response = send(admin_api, "post", URL, body)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["message"]
    assert not NotificationChannel.objects.exists()


@pytest.mark.django_db
def test_removing_a_channel_and_unknown_ids(admin_api: Client) -> None:
    created = add_channel(admin_api, url="https://example.com/hook", events=["spike"])
    assert send(admin_api, "delete", f"{URL}{created['id']}").status_code == 204
    assert not NotificationChannel.objects.exists()
    assert send(admin_api, "get", f"{URL}{created['id']}").status_code == 404
    assert send(admin_api, "post", f"{URL}nope/test").status_code == 404
    assert AuditEvent.objects.filter(action="alerts.channel_removed").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_paused_channel_gets_nothing_and_its_events_can_change(
    admin_api: Client, anthropic: Any
) -> None:
    created = add_channel(admin_api, url="https://example.com/hook", events=["spike"])
    url = f"{URL}{created['id']}"
    paused = send(admin_api, "patch", url, {"enabled": False, "events": ["agent.waiting"]})
    assert paused.status_code == 200, paused.content
    assert (paused.json()["enabled"], paused.json()["events"]) == (False, ["agent.waiting"])
    enroll("bob")
    assert deliveries() == []
    assert send(admin_api, "patch", url, {"enabled": True}).json()["enabled"] is True
    enroll("carol")
    assert [d.payload["data"]["agent"] for d in deliveries()] == ["carol"]
    for bad in ({"enabled": "no"}, {"events": []}, {"url": "https://elsewhere.example"}):
        refused = send(admin_api, "patch", url, bad)
        assert refused.status_code == 400, bad
        assert next(iter(bad)) in refused.json()["error"]["message"]
    assert NotificationChannel.objects.get().events == ["agent.waiting"]
    updates = AuditEvent.objects.filter(action="alerts.channel_updated").order_by("id")
    assert [e.detail.get("enabled") for e in updates] == [False, True]


@pytest.mark.django_db
def test_the_api_is_for_admins_only(admin_api: Client) -> None:
    assert Client().get(URL).status_code in {401, 403}


# --- which events alert, and each channel's shape -----------------------------------------
@pytest.mark.django_db(transaction=True)
def test_an_enrollment_reaches_a_webhook_signed_with_a_link_to_approve(
    admin_api: Client, receiver: Receiver, anthropic: Any, settings: Any
) -> None:
    settings.PUBLIC_URL = "https://keys.example.com"
    secret = add_channel(admin_api, url=f"{receiver.url}/hook", events=["agent.waiting"])[
        "signing_secret"
    ]
    agent, _ = enroll("ci-runner")
    (delivery,) = deliveries()
    delivery_attempt(delivery_id=str(delivery.pk))

    (seen,) = receiver.seen
    assert seen.path == "/hook"
    assert signature_valid(secret, seen.headers["x-keybroker-signature"], seen.body)
    assert not signature_valid("ckw_wrong", seen.headers["x-keybroker-signature"], seen.body)
    body = json.loads(seen.body)
    assert body["id"] == seen.headers["x-keybroker-delivery"] == str(delivery.pk)
    assert (body["event"], seen.headers["x-keybroker-event"]) == ("agent.waiting",) * 2
    assert body["text"] == "Agent ci-runner enrolled and waits for approval (asks for anthropic)"
    assert body["link"] == f"https://keys.example.com/admin/broker/agent/{agent.pk}/change/"
    assert body["data"]["agent"] == "ci-runner"
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts) == (DeliveryState.DELIVERED, 1)
    assert [(a.number, a.status, a.error) for a in delivery.attempt_log.all()] == [(1, 200, "")]


@pytest.mark.django_db(transaction=True)
def test_an_agent_created_by_an_admin_is_no_alert_but_asking_for_more_scopes_is(
    admin_api: Client, anthropic: Any, staging: Any
) -> None:
    add_channel(
        admin_api,
        url="https://example.com/hook",
        events=["agent.waiting", "agent.scopes_requested"],
    )
    created = send(admin_api, "post", "/v1/admin/agents/", {"name": "ci", "scopes": ["anthropic"]})
    assert created.status_code == 201
    assert deliveries() == []
    asked = send(
        as_agent(created.json()["vend_token"]),
        "post",
        "/v1/request",
        {"scopes": ["anthropic-staging"]},
    )
    assert asked.status_code in {200, 202}, asked.content
    (delivery,) = deliveries()
    assert delivery.event == "agent.scopes_requested"
    assert delivery.payload["text"] == "Agent ci asks for more scopes: anthropic-staging"


@pytest.mark.django_db(transaction=True)
def test_slack_gets_text_with_the_link_and_no_signature(
    admin_api: Client, receiver: Receiver, anthropic: Any
) -> None:
    created = add_channel(
        admin_api,
        kind="slack",
        url=f"{receiver.url}/services/T0001/B0002/SeCrEtPaTh",
        events=["agent.waiting"],
    )
    assert created["signing_secret"] == ""
    assert created["target"].endswith("/…PaTh")
    agent, _ = enroll("bob")
    attempt_all()
    (seen,) = receiver.seen
    assert seen.path == "/services/T0001/B0002/SeCrEtPaTh"
    assert "x-keybroker-signature" not in seen.headers
    link = f"/admin/broker/agent/{agent.pk}/change/"
    text = json.loads(seen.body)["text"]
    assert list(json.loads(seen.body)) == ["text"]
    assert text.startswith("Agent bob enrolled and waits for approval (asks for anthropic)\n<")
    assert text.endswith(f"{link}|Open in keybroker>")


@pytest.mark.django_db(transaction=True)
def test_an_invalid_key_is_emailed_once_until_it_validates_again(
    admin_api: Client, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    add_channel(
        admin_api, kind="email", url="ops@example.com, oncall@example.com",
        events=["backend.key_invalid"],
    )  # fmt: skip
    key = api_key(tail="B4dK")
    backend = backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    backend_validate(backend=backend)  # the fake knows no key: 401
    backend_validate(backend=backend)  # the hourly check again: no second alert
    (delivery,) = deliveries("backend.key_invalid")
    attempt_all()
    (message,) = mail.outbox
    assert message.to == ["ops@example.com", "oncall@example.com"]
    assert message.subject.startswith(
        "[keybroker] Key sk-ant-api03-…B4dK of backend anthropic failed validation"
    )
    assert f"/admin/broker/backend/{backend.pk}/change/" in message.body
    assert key not in message.body
    assert key not in json.dumps(delivery.payload)

    fake_anthropic.valid_keys.add(key)
    backend_validate(backend=backend)
    fake_anthropic.valid_keys.discard(key)
    backend_validate(backend=backend)
    assert len(deliveries("backend.key_invalid")) == 2  # invalid again after being valid


@pytest.mark.django_db(transaction=True)
def test_a_receiver_that_fails_is_retried_with_backoff_and_each_try_logged(
    admin_api: Client, receiver: Receiver, anthropic: Any, settings: Any
) -> None:
    settings.ALERT_MAX_ATTEMPTS = 3
    receiver.failures = 5
    add_channel(admin_api, url=f"{receiver.url}/hook", events=["agent.waiting"])
    enroll("bob")
    (delivery,) = deliveries()
    assert delivery_attempt(delivery_id=str(delivery.pk)) == retry_delay(1)
    # A task that comes before the backoff has passed (a duplicate) tries nothing.
    assert delivery_attempt(delivery_id=str(delivery.pk)) is None
    assert len(receiver.seen) == 1
    waits = [try_now(delivery) for _ in range(3)]
    assert waits == [retry_delay(2), None, None]
    assert retry_delay(2) == 2 * retry_delay(1)
    assert retry_delay(30) == settings.ALERT_RETRY_MAX_SECONDS
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts, delivery.last_error) == (
        DeliveryState.FAILED, 3, "the receiver answered 500",
    )  # fmt: skip
    assert [a.status for a in delivery.attempt_log.all()] == [500, 500, 500]
    assert len(receiver.seen) == 3
    # Every try carried the same delivery id, so a receiver can drop a repeat.
    assert {seen.headers["x-keybroker-delivery"] for seen in receiver.seen} == {str(delivery.pk)}


@pytest.mark.django_db(transaction=True)
def test_a_redirect_is_not_followed_and_not_retried(admin_api: Client, anthropic: Any) -> None:
    class Redirector(Receiver):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                self.seen.append(scope)  # type: ignore[arg-type]
                await send({"type": "http.response.start", "status": 307,
                            "headers": [(b"location", b"http://169.254.169.254/")]})  # fmt: skip
                await send({"type": "http.response.body", "body": b""})

    from tests.conftest import served

    redirector = Redirector()
    with served(redirector) as url:
        add_channel(admin_api, url=f"{url}/hook", events=["agent.waiting"])
        enroll("bob")
        (delivery,) = deliveries()
        assert delivery_attempt(delivery_id=str(delivery.pk)) is None
    delivery.refresh_from_db()
    assert (delivery.state, delivery.last_error) == (
        DeliveryState.FAILED, "redirects are not followed",
    )  # fmt: skip
    assert len(redirector.seen) == 1


@pytest.mark.django_db(transaction=True)
def test_a_delivery_whose_task_was_lost_is_queued_again(admin_api: Client, anthropic: Any) -> None:
    add_channel(admin_api, url="https://example.com/hook", events=["agent.waiting"])
    enroll("bob")
    (delivery,) = deliveries()
    queue = f"{settings.REDIS_KEY_PREFIX}:celery:{settings.CELERY_TASK_DEFAULT_QUEUE}"
    redis_client().delete(queue)  # the task is lost
    assert deliveries_requeue() == 0  # not overdue yet: its task may just be slow
    NotificationDelivery.objects.update(next_try_at=timezone.now() - timedelta(minutes=6))
    assert deliveries_requeue() == 1
    (message,) = redis_client().lrange(queue, 0, -1)
    headers = json.loads(message)["headers"]
    assert headers["task"] == "audit.tasks.notification_deliver_task"
    assert str(delivery.pk) in headers["argsrepr"]


# --- budgets, through the proxy ----------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_budget_alerts_once_at_80_and_once_at_100_percent(
    proxied: Proxied, fake_anthropic: FakeAnthropic, admin_api: Client
) -> None:
    add_channel(admin_api, url="https://example.com/hook", events=["budget.80", "budget.100"])
    set_policy(daily_usd="0.0001")  # one call costs $0.000042: 42 %, 84 %, 126 %
    client = sdk(proxied)
    for total in ("0.000042", "0.000084", "0.000126"):
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
        wait_until_spent("daily_usd", total)
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
    audit_drained()

    wait_until(lambda: len(deliveries()) == 2, timeout=10, what=lambda: f"{deliveries()}")
    eighty, hundred = deliveries()
    assert (eighty.event, hundred.event) == ("budget.80", "budget.100")
    assert eighty.payload["text"] == (
        "Agent bob on anthropic: daily_usd budget 80% used: $0.000084 of $0.0001 "
        "(it renews at 00:00 UTC)"
    )
    assert hundred.payload["data"]["used"] == "0.000126"
    assert hundred.payload["data"]["percent"] == 100
    assert hundred.payload["data"]["period"] == timezone.now().date().isoformat()
    events = AuditEvent.objects.filter(action="budget.threshold").order_by("id")
    assert [e.detail["percent"] for e in events] == [80, 100]
    assert len(fake_anthropic.requests) == 3


# --- spikes ------------------------------------------------------------------------------------
def _seed_calls(agent: str, *, hours_ago: float, count: int, cost: str, status: int = 200) -> None:
    at = timezone.now() - timedelta(hours=hours_ago)
    AuditEvent.objects.bulk_create(
        AuditEvent(
            created_at=at, action="proxy.request", actor_type="agent", actor=agent, agent=agent,
            backend="anthropic", status=status, outcome="ok", cost_usd=Decimal(cost),
        )
        for _ in range(count)
    )  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_a_cost_spike_over_three_times_the_agents_own_baseline_alerts_once(
    admin_api: Client, anthropic: Any
) -> None:
    add_channel(admin_api, url="https://example.com/hook", events=["spike"])
    enroll("bob")
    enroll("carol")
    for hours_ago in range(2, 25):  # a steady $0.50 an hour for a day
        _seed_calls("bob", hours_ago=hours_ago, count=5, cost="0.10")
        _seed_calls("carol", hours_ago=hours_ago, count=5, cost="0.10")
    _seed_calls("bob", hours_ago=0.5, count=20, cost="0.10")  # $2.00 in the last hour
    _seed_calls("carol", hours_ago=0.5, count=10, cost="0.10")  # $1.00: only 2 times

    (spike,) = spikes_check()
    assert (spike.agent, spike.rule) == ("bob", "cost")
    (delivery,) = deliveries("spike")
    assert delivery.payload["text"] == (
        "Agent bob: cost spike: $2.00 in the last hour, over 3 times its mean of $0.48 an "
        "hour in the 24 hours before (and over $1.00)"
    )
    assert delivery.payload["data"]["rule"] == "cost"
    assert spikes_check() == []  # the same spike is not said again for 6 hours
    assert len(deliveries("spike")) == 1


@pytest.mark.django_db(transaction=True)
def test_an_error_rate_spike_needs_enough_failures(admin_api: Client, anthropic: Any) -> None:
    add_channel(admin_api, url="https://example.com/hook", events=["spike"])
    enroll("bob")
    _seed_calls("bob", hours_ago=5, count=100, cost="0")
    _seed_calls("bob", hours_ago=0.2, count=19, cost="0", status=500)
    assert spikes_check() == []  # 19 failures: under the floor of 20
    _seed_calls("bob", hours_ago=0.1, count=1, cost="0", status=529)
    (spike,) = spikes_check()
    assert spike.rule == "error_rate"
    assert "20 of 20 calls failed in the last hour (100%)" in spike.message
    assert Agent.objects.filter(name="bob").exists()


@pytest.mark.django_db(transaction=True)
def test_a_daily_token_budget_alerts_in_tokens(
    proxied: Proxied, fake_anthropic: FakeAnthropic, admin_api: Client
) -> None:
    add_channel(admin_api, url="https://example.com/hook", events=["budget.80", "budget.100"])
    set_policy(daily_tokens=50)  # one call counts 21 tokens: 12 in, 3 cached, 6 out
    client = sdk(proxied)
    for used in (21, 42, 63):
        client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)
        wait_until(
            lambda used=used: spent("daily_tokens") == used,  # type: ignore[misc]
            timeout=5,
            what=f"{used} tokens counted",
        )
    audit_drained()
    wait_until(lambda: len(deliveries()) == 2, timeout=10, what=lambda: f"{deliveries()}")
    eighty, hundred = deliveries()
    assert eighty.payload["data"] | {"period": ""} == {
        "agent": "bob", "backend": "anthropic", "budget": "daily_tokens", "percent": 80,
        "used": 42, "limit": 50, "period": "",
    }  # fmt: skip
    assert hundred.payload["text"] == (
        "Agent bob on anthropic: daily_tokens budget 100% used: 63 of 50 tokens "
        "(it renews at 00:00 UTC)"
    )


def test_beat_checks_spikes_and_overdue_deliveries_each_run_expiring_before_the_next() -> None:
    from audit import tasks

    for name, task in (
        ("alerts-spike", tasks.alerts_spike_task),
        ("alerts-requeue", tasks.notification_requeue_task),
    ):
        entry = settings.CELERY_BEAT_SCHEDULE[name]
        assert entry["task"] == task.name
        assert 0 < entry["options"]["expires"] < entry["schedule"]
    assert tasks.notification_deliver_task.name == "audit.tasks.notification_deliver_task"


# --- held calls (issue 18, part 2) ----------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_held_call_alerts_with_a_link_to_the_activity_page(
    proxied: Proxied, fake_anthropic: FakeAnthropic, admin_api: Client, alice: Any
) -> None:
    add_channel(admin_api, url="https://example.com/hook", events=["call.held"])
    set_policy(hold={"all": True})
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            sdk(proxied).messages.create, model=HAIKU, max_tokens=8, messages=HELLO
        )
        wait_until(lambda: deliveries("call.held"), timeout=10, what="the held call's alert")
        (call,) = held_calls_waiting()
        held_call_decide(held_id=call.id, approve=True, by=alice)
        assert answer.result(timeout=10).usage
    (alert,) = deliveries("call.held")
    assert alert.payload["text"].startswith(
        "A call of agent bob to anthropic waits for approval: held for approval (all)"
    )
    assert alert.payload["link"].endswith("/activity/")
    assert alert.payload["data"]["hold_id"] == call.id
    assert alert.payload["data"]["model"] == HAIKU
    assert len(fake_anthropic.requests) == 1
