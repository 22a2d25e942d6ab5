from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from broker import __version__
from broker.infra.redis import redis_client, redis_key
from broker.runtime.embedded_redis import start_embedded_redis
from broker.runtime.health import worker_heartbeat_record

pytestmark = pytest.mark.django_db


def test_health_reports_version_and_counts(client: Client) -> None:
    get_user_model().objects.create_superuser("alice", password="pw-alice-123")
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["counts"]["admins"] == 1


def test_ready_is_ok_when_database_redis_and_worker_are(client: Client) -> None:
    worker_heartbeat_record()
    response = client.get("/ready")
    assert response.status_code == 200
    checks = response.json()["checks"]
    assert {name: c["ok"] for name, c in checks.items()} == {
        "database": True,
        "redis": True,
        "worker": True,
    }


def test_ready_is_503_without_a_worker_heartbeat(client: Client) -> None:
    redis_client().delete(redis_key("worker", "heartbeat"))
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["worker"] == {
        "ok": False,
        "detail": "no heartbeat from any Celery worker yet",
    }


def test_ready_is_503_when_the_heartbeat_is_stale(client: Client) -> None:
    redis_client().set(redis_key("worker", "heartbeat"), str(time.time() - 600))
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["worker"]["ok"] is False


def test_ready_is_503_when_redis_goes_away(client: Client, tmp_path: Path) -> None:
    socket_path = tmp_path / "r.sock"
    doomed = start_embedded_redis(
        data_dir=tmp_path, socket_path=socket_path, stdout=subprocess.DEVNULL
    )
    with override_settings(REDIS_URL=f"unix://{socket_path}"):
        worker_heartbeat_record()
        assert client.get("/ready").status_code == 200
        doomed.terminate()
        doomed.wait(timeout=10)
        response = client.get("/ready")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["redis"]["ok"] is False
    assert checks["database"]["ok"] is True
    assert checks["worker"]["ok"] is False


def test_unknown_paths_get_a_json_404(client: Client) -> None:
    response = client.get("/no/such/thing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


def test_ready_shows_an_invalid_backend_without_failing(client: Client) -> None:
    from broker.models import Backend
    from broker.services.backends import backend_add
    from tests.keys import api_key

    backend = backend_add(name="anthropic", secret=api_key())
    Backend.objects.filter(pk=backend.pk).update(
        validation_state="invalid", validation_message="upstream answered 401"
    )
    worker_heartbeat_record()
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json()["backends"] == {
        "anthropic": {"state": "invalid", "detail": "upstream answered 401"}
    }
    assert client.get("/health").json()["counts"]["backends"] == 1


def test_ready_shows_a_waiting_audit_spill_without_failing(client: Client, settings: Any) -> None:
    worker_heartbeat_record()
    assert client.get("/ready").json()["audit"] == {"queued": 0, "spill_waiting": False}
    spill = settings.DATA_DIR / "audit-spill.jsonl"
    spill.write_text('{"action": "proxy.request"}\n')
    try:
        response = client.get("/ready")
    finally:
        spill.unlink()
    assert response.status_code == 200
    assert response.json()["audit"]["spill_waiting"] is True
