"""GET /metrics (issue 17): counters that move by exactly the calls made, across web
processes that share one PROMETHEUS_MULTIPROC_DIR, and who may read them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.db.models import Sum
from django.test import Client
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from audit.metrics import CALL_ACTIONS
from audit.models import AuditEvent
from broker.infra.metrics import DURATION_BUCKETS, LOCAL, histogram_observe_many
from broker.models import BackendKey, Grant
from broker.project.celery import app
from broker.runtime.serve import metrics_env
from broker.services.admin_tokens import admintoken_create
from broker.services.policy import grant_update
from tests.conftest import REPO, free_port
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, proxied_for
from tests.servers import process_env, uvicorn_serving
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HAIKU = "claude-haiku-4-5"
OPUS = "claude-opus-4-1"
HELLO = [{"role": "user", "content": "Hello"}]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape by name and label set, read by prometheus_client's parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def anthropic_value(samples: Samples, name: str, **labels: str) -> float:
    """``keybroker_proxy_{name}`` of the anthropic backend."""
    return value(samples, f"keybroker_proxy_{name}", backend="anthropic", **labels)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


def label_names(samples: Samples, name: str) -> set[str]:
    return {key for (n, got), _ in samples.items() if n == name for key, _ in got}


def scrape(url: str, token: str) -> str:
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


@pytest.fixture
def admin_token(alice: AbstractBaseUser) -> str:
    return admintoken_create(name="prometheus", username="alice").plaintext


@pytest.fixture
def bob_proxied(fake_anthropic: FakeAnthropic, alice: AbstractBaseUser) -> Proxied:
    """bob's token on the anthropic backend; the grant allows Haiku only, so Opus is refused
    by the policy's models rule."""
    proxied = proxied_for(live_url="http://unused", fake=fake_anthropic, alice=alice)
    grant_update(grant=Grant.objects.get(agent__name="bob"), policy={"models": ["claude-haiku-*"]})
    return proxied


@contextmanager
def web_processes(count: int, directory: Path, **env: str) -> Iterator[list[str]]:
    """``count`` web processes started as `serve` starts them, sharing one metrics directory."""
    with ExitStack() as stack:
        urls = [
            stack.enter_context(
                uvicorn_serving(
                    port=free_port(),
                    env=process_env(PROMETHEUS_MULTIPROC_DIR=str(directory), **env),
                )
            )
            for _ in range(count)
        ]
        yield urls


def sdk(url: str, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{url}/v1/proxy/anthropic", api_key=token, max_retries=0)


def calls(sdk_client: anthropic.Anthropic, allowed: int, refused: int) -> None:
    for _ in range(allowed):
        sdk_client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    for _ in range(refused):
        with pytest.raises(anthropic.PermissionDeniedError):
            sdk_client.messages.create(model=OPUS, max_tokens=8, messages=HELLO)  # type: ignore[arg-type]


def audited(count: int) -> None:
    wait_until(
        lambda: AuditEvent.objects.filter(action__in=CALL_ACTIONS).count() == count,
        timeout=20,
        what=f"{count} proxied calls in the audit trail",
    )


def scraped_until(url: str, token: str, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until ``name`` reaches ``expected``: a row is counted just after it is written."""

    def reached() -> Samples | None:
        samples = parse(scrape(url, token))
        return samples if value(samples, name, **labels) == expected else None

    return wait_until(reached, timeout=10, what=f"{name} {labels} to read {expected}")


@pytest.mark.slow
def test_counters_move_by_exactly_the_calls_made_through_two_web_processes(
    bob_proxied: Proxied, admin_token: str, tmp_path: Path
) -> None:
    ok_a, ok_b, refused_a, refused_b = 3, 2, 2, 1
    with web_processes(2, tmp_path) as (first, second):
        calls(sdk(first, bob_proxied.token), ok_a, refused_a)
        calls(sdk(second, bob_proxied.token), ok_b, refused_b)
        audited(ok_a + ok_b + refused_a + refused_b)
        ok, refused = ok_a + ok_b, refused_a + refused_b
        rows = AuditEvent.objects.filter(action="proxy.request").aggregate(
            input=Sum("input_tokens"), output=Sum("output_tokens"), cost=Sum("cost_usd")
        )
        assert rows["input"]
        assert rows["output"]
        assert rows["cost"]
        # Either process answers for both: the scrape adds up every process's files.
        for url in (first, second):
            samples = scraped_until(
                url, admin_token, "keybroker_proxy_calls_total", ok,
                backend="anthropic", status="200", outcome="ok",
            )  # fmt: skip
            denied = anthropic_value(samples, "calls_total", status="403", outcome="denied")
            assert denied == refused
            assert total(samples, "keybroker_proxy_calls_total") == ok + refused
            assert anthropic_value(samples, "refusals_total", rule="models") == refused
            assert total(samples, "keybroker_proxy_refusals_total") == refused
            # Every call has a duration; only those the upstream answered have a first byte.
            assert anthropic_value(samples, "duration_seconds_count") == ok + refused
            assert anthropic_value(samples, "duration_seconds_bucket", le="+Inf") == ok + refused
            assert anthropic_value(samples, "ttfb_seconds_count") == ok
            # Tokens and cost are the audit trail's, by model.
            for kind in ("input", "output"):
                tokens = anthropic_value(samples, "tokens_total", model=HAIKU, kind=kind)
                assert tokens == rows[kind]
            cost = Decimal(str(anthropic_value(samples, "cost_usd_total", model=HAIKU)))
            assert cost.quantize(Decimal("0.000001")) == rows["cost"]
            # No agent label unless asked for, and no model label for what was refused.
            assert "agent" not in label_names(samples, "keybroker_proxy_calls_total")
            assert total(samples, "keybroker_proxy_tokens_total", model=OPUS) == 0
            # Each process's queue is empty once everything is written.
            assert value(samples, "keybroker_audit_queue_depth") == 0


@pytest.mark.slow
def test_agent_names_are_a_label_only_when_opted_in(
    bob_proxied: Proxied, admin_token: str, tmp_path: Path
) -> None:
    with web_processes(1, tmp_path, KEYBROKER_METRICS_AGENT_LABEL="true") as (url,):
        calls(sdk(url, bob_proxied.token), 2, 1)
        audited(3)
        samples = scraped_until(
            url, admin_token, "keybroker_proxy_calls_total", 2,
            backend="anthropic", status="200", outcome="ok", agent="bob",
        )  # fmt: skip
        assert anthropic_value(samples, "refusals_total", rule="models", agent="bob") == 1
        assert "agent" in label_names(samples, "keybroker_proxy_duration_seconds_count")


@pytest.mark.slow
def test_nothing_secret_is_in_the_output(
    bob_proxied: Proxied, admin_token: str, tmp_path: Path
) -> None:
    with web_processes(1, tmp_path) as (url,):
        calls(sdk(url, bob_proxied.token), 1, 0)
        audited(1)
        scraped_until(url, admin_token, "keybroker_proxy_calls_total", 1,
                      backend="anthropic", status="200", outcome="ok")  # fmt: skip
        text = scrape(url, admin_token)
    key = BackendKey.objects.get(backend__name="anthropic")
    for secret in (bob_proxied.key, bob_proxied.token, admin_token, key.fingerprint):
        assert secret not in text
    assert key.fingerprint[-4:] not in text  # not even the fingerprint's tail


# --- who may read it (in this process: no multiprocess directory, one process) ------------
def _staff(username: str, *codenames: str) -> str:
    user = get_user_model().objects.create_user(username, password="pw-123456", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return admintoken_create(name=username, username=username).plaintext


def test_without_a_token_a_scrape_is_refused_with_the_json_error(settings: Any) -> None:
    settings.METRICS_ALLOW = []
    response = Client().get("/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    bad = Client(HTTP_AUTHORIZATION="Bearer cka_" + "x" * 43).get("/metrics")
    assert bad.status_code == 401
    assert bad.json()["error"]["message"] == "invalid or revoked admin token"


def test_a_token_needs_view_auditevent(admin_token: str) -> None:
    refused = Client(HTTP_AUTHORIZATION=f"Bearer {_staff('carol', 'view_agent')}").get("/metrics")
    assert refused.status_code == 403
    assert "view_auditevent" in refused.json()["error"]["message"]
    auditor = _staff("dave", "view_auditevent")
    for token in (auditor, admin_token):
        response = Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/metrics")
        assert response.status_code == 200
        assert "keybroker_audit_queue_depth" in response.content.decode()


def test_prometheus_gets_openmetrics_when_it_asks(admin_token: str) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    api = Client(HTTP_AUTHORIZATION=f"Bearer {admin_token}", HTTP_ACCEPT=accept)
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response["content-type"].startswith("application/openmetrics-text")
    families = {f.name for f in openmetrics_families(response.content.decode())}
    assert {"keybroker_audit_queue_depth", "keybroker_backend_keys"} <= families


def test_an_allow_listed_address_needs_no_token(settings: Any) -> None:
    settings.METRICS_ALLOW = ["10.1.0.0/16", "::1"]
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="::ffff:10.1.2.3").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="::1").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="10.2.0.1").get("/metrics").status_code == 401
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 401


@pytest.mark.slow
def test_a_forwarded_address_from_an_untrusted_peer_is_not_believed(tmp_path: Path) -> None:
    """Without KEYBROKER_TRUSTED_PROXIES, X-Forwarded-For cannot claim an allowed address."""
    with web_processes(1, tmp_path, KEYBROKER_METRICS_ALLOW="10.9.9.9") as (url,):
        forged = httpx.get(f"{url}/metrics", headers={"X-Forwarded-For": "10.9.9.9"})
        assert forged.status_code == 401
        assert forged.json()["error"]["type"] == "authentication_error"


@pytest.mark.slow
def test_with_the_database_down_an_allowed_scraper_still_gets_the_audit_metrics(
    tmp_path: Path,
) -> None:
    """What an outage needs most (the audit queue, the spill file) is served without the
    key states; a token cannot be checked then, an allowed address needs no database."""
    env = {
        **process_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path), KEYBROKER_METRICS_ALLOW="127.0.0.1"),
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{free_port()}/down",  # nothing listens
    }
    with uvicorn_serving(port=free_port(), env=env) as url:
        response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"keybroker_audit_queue_depth", "keybroker_audit_spill_bytes"} <= names
    assert "keybroker_backend_keys" not in names


def test_key_states_are_read_at_scrape_time(bob_proxied: Proxied, admin_token: str) -> None:
    api = Client(HTTP_AUTHORIZATION=f"Bearer {admin_token}")
    samples = parse(api.get("/metrics").content.decode())
    assert (
        value(samples, "keybroker_backend_keys", backend="anthropic", state="unknown")
        + value(samples, "keybroker_backend_keys", backend="anthropic", state="valid")
        == 1
    )
    BackendKey.objects.filter(backend__name="anthropic").update(validation_state="invalid")
    samples = parse(api.get("/metrics").content.decode())
    assert value(samples, "keybroker_backend_keys", backend="anthropic", state="invalid") == 1
    assert (
        "keybroker_backend_keys",
        frozenset({("backend", "anthropic"), ("state", "valid")}),
    ) in samples
    BackendKey.objects.filter(backend__name="anthropic").update(enabled=False)
    samples = parse(api.get("/metrics").content.decode())
    assert value(samples, "keybroker_backend_keys", backend="anthropic", state="disabled") == 1
    assert value(samples, "keybroker_backend_keys", backend="anthropic", state="invalid") == 0


# --- Celery task outcomes ---------------------------------------------------------------------
@app.task(name="tests.metrics.flaky", bind=True)
def flaky(task: Any, mode: str) -> str:
    if mode == "fail":
        raise ValueError("meant to fail")
    if mode == "retry" and task.request.retries == 0:
        raise task.retry(countdown=0, max_retries=1)
    return "done"


def celery_count(task: str, outcome: str) -> float:
    return (
        LOCAL.get_sample_value("keybroker_celery_tasks_total", {"task": task, "outcome": outcome})
        or 0.0
    )


def test_task_outcomes_are_counted_by_name() -> None:
    before = {
        outcome: celery_count("tests.metrics.flaky", outcome)
        for outcome in ("success", "failure", "retry")
    }
    flaky.apply(args=["ok"])
    flaky.apply(args=["fail"])
    flaky.apply(args=["retry"])
    moved = {
        outcome: celery_count("tests.metrics.flaky", outcome) - before[outcome]
        for outcome in before
    }
    # The retried run succeeds the second time: one retry, then a success of its own.
    assert moved == {"success": 2, "failure": 1, "retry": 1}


@pytest.mark.slow
def test_a_worker_process_counts_into_the_machines_directory(tmp_path: Path) -> None:
    """The worker writes where the web processes read: a task it ran is in their sum."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "broker", "worker", "--pool", "solo",
         "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
        cwd=REPO, env=process_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]

    def ran() -> float:
        assert worker.poll() is None, "the worker died"
        return (
            registry.get_sample_value(
                "keybroker_celery_tasks_total",
                {"task": "broker.tasks.heartbeat", "outcome": "success"},
            )
            or 0.0
        )

    try:
        app.send_task("broker.tasks.heartbeat")
        assert wait_until(ran, timeout=60, what="the worker to run the heartbeat task") == 1
    finally:
        worker.terminate()
        worker.wait(timeout=20)


def test_a_batch_of_amounts_lands_in_the_buckets_observe_would_choose() -> None:
    registry = CollectorRegistry()
    one_by_one = Histogram("by_observe", "", buckets=DURATION_BUCKETS, registry=registry)
    batched = Histogram("by_batch", "", buckets=DURATION_BUCKETS, registry=registry)
    # Bounds exactly (le is inclusive), between them, below the first, above the last.
    amounts = [0.0, 0.01, 0.0100001, 0.3, 1.0, 2.5, 599.9, 600.0, 601.0, 5000.0, 0.7, 0.7]
    for amount in amounts:
        one_by_one.observe(amount)
    histogram_observe_many(batched, amounts)
    for bound in [*DURATION_BUCKETS[:-1], "+Inf"]:
        le = {"le": str(float(bound)) if bound != "+Inf" else "+Inf"}
        assert registry.get_sample_value("by_batch_bucket", le) == registry.get_sample_value(
            "by_observe_bucket", le
        ), le
    assert registry.get_sample_value("by_batch_count") == len(amounts)
    assert registry.get_sample_value("by_batch_sum") == pytest.approx(sum(amounts))


def test_serve_gives_its_children_an_emptied_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    settings.DATA_DIR = tmp_path
    own = tmp_path / "metrics"
    assert metrics_env()["PROMETHEUS_MULTIPROC_DIR"] == str(own)
    assert own.is_dir()
    # The last run's files go (a dead process's live gauges would still be summed);
    # anything else an operator keeps in a directory of their own stays.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "counter_4242.db").write_bytes(b"old")
    (theirs / "notes.txt").write_text("mine")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(theirs))
    env = metrics_env()
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(theirs)
    assert sorted(path.name for path in theirs.iterdir()) == ["notes.txt"]
