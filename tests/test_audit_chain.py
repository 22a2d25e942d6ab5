"""The audit trail's hash chain (issue 18, part 3): every door writes one chain, `manage.py
audit verify` names an edited, deleted or inserted row, retention keeps it verifiable, two
web processes writing at once keep it intact, and the export and syslog sink copy it out."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from audit.chain import GENESIS, chain_verify, chain_write
from audit.models import AuditChain, AuditCheckpoint, AuditEvent
from audit.recorder import audit_enqueue, audit_flush
from audit.services import audit_prune, audit_record
from audit.sink import audit_sink_stats
from tests.conftest import REPO
from tests.proxy_cast import Proxied
from tests.servers import process_env
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def verify(*args: str) -> str:
    out = StringIO()
    call_command("audit", "verify", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def broken(*args: str) -> str:
    with pytest.raises(CommandError) as raised:
        verify(*args)
    return str(raised.value)


def raw(sql: str, *params: Any) -> None:
    """Around the model and its append-only guards, as someone with database access would."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def some_events(count: int = 5) -> list[AuditEvent]:
    return [
        audit_record(action="backend.updated", backend="anthropic", message=f"change {n}")
        for n in range(count)
    ]


@transaction.atomic
def recorded_then_rolled_back() -> None:
    audit_record(action="token.issued", backend="anthropic")
    raise RuntimeError("the action failed")


def test_every_door_writes_one_chain_in_write_order() -> None:
    audit_record(action="backend.added", backend="anthropic", ttl=600, ratio=2.0)
    with pytest.raises(RuntimeError):
        recorded_then_rolled_back()  # its event and its place go with it
    chain_write(
        [
            {"action": "proxy.request", "actor_type": "agent", "created_at": timezone.now(),
             "status": 200, "cost_usd": "0.5", "ttfb_ms": 12.25, "client_address": "::1",
             "detail": {"nested": {"b": 1, "a": [1.0, "x"]}}},
        ]
    )  # fmt: skip
    events = list(AuditEvent.objects.order_by("chain_seq"))
    assert [e.chain_seq for e in events] == [1, 2]
    assert [e.action for e in events] == ["backend.added", "proxy.request"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", e.chain_hash) for e in events)
    head = AuditChain.objects.get(pk=1)
    assert (head.seq, head.hash) == (2, events[-1].chain_hash)
    assert events[1].cost_usd == Decimal("0.500000")  # read back as the database keeps it
    assert verify() == "audit chain intact: 2 event(s), #1 to #2\n"


async def test_the_proxy_recorder_writes_into_the_same_chain(proxied: Proxied) -> None:
    for number in range(3):
        audit_enqueue(action="proxy.request", agent="bob", backend="anthropic", status=200,
                      request_id=f"req_{number}", cost_usd=Decimal("0.0123"))  # fmt: skip
    await audit_flush()
    try:
        result = await sync_to_async(chain_verify)()
        assert result.intact, result.breaks
        assert result.checked == await AuditEvent.objects.acount()
        last = [e async for e in AuditEvent.objects.order_by("-chain_seq")[:3]]
        assert [e.request_id for e in last] == ["req_2", "req_1", "req_0"]
    finally:
        # The executor thread's connection would outlive the test database otherwise.
        await sync_to_async(connections.close_all)()


def test_an_edited_row_fails_verify_naming_it() -> None:
    events = some_events()
    raw("UPDATE audit_auditevent SET message = %s WHERE id = %s", "nothing here", events[2].pk)
    assert broken() == f"the audit chain is broken at event {events[2].pk}: edited"

    err = StringIO()
    with pytest.raises(CommandError):
        call_command("audit", "verify", stdout=StringIO(), stderr=err)
    assert f"event {events[2].pk} (#3): its fields do not match its hash (edited)" in err.getvalue()


def test_an_edited_detail_or_time_is_found_too() -> None:
    events = some_events(3)
    raw(
        "UPDATE audit_auditevent SET created_at = %s WHERE id = %s",
        events[0].created_at - timedelta(hours=1),
        events[0].pk,
    )
    assert broken() == f"the audit chain is broken at event {events[0].pk}: edited"


def test_a_deleted_row_fails_verify_naming_the_gap() -> None:
    events = some_events()
    raw("DELETE FROM audit_auditevent WHERE id = %s", events[1].pk)
    assert broken() == f"the audit chain is broken at event {events[2].pk}: deleted"
    result = chain_verify()
    assert "the event(s) before it at #2 are missing (deleted)" in result.breaks[0].message


def test_deleting_the_newest_rows_is_found_from_the_head() -> None:
    events = some_events()
    raw("DELETE FROM audit_auditevent WHERE id >= %s", events[3].pk)
    assert broken() == "the audit chain is broken at its end: deleted"
    assert "the last event(s) at #4-#5 are missing" in chain_verify().breaks[0].message


def test_a_row_inserted_around_the_writer_fails_verify_naming_it() -> None:
    some_events(2)
    forged = AuditEvent.objects.create(action="token.revoked", actor_type="admin", actor="alice")
    assert broken() == f"the audit chain is broken at event {forged.pk}: inserted"


def test_a_forged_row_with_a_place_and_a_made_up_hash_is_found() -> None:
    events = some_events(2)
    raw(
        "INSERT INTO audit_auditevent (created_at, action, actor_type, actor, agent, backend,"
        " token_id, token_prefix, message, method, path, model, outcome, request_id,"
        " stop_reason, policy_result, policy_reason, detail, chain_seq, chain_hash)"
        " VALUES (%s, 'token.revoked', 'admin', 'alice', '', '', '', '', '', '', '', '', '',"
        " '', '', '', '', '{}', 3, %s)",
        timezone.now(),
        events[-1].chain_hash,
    )
    forged = AuditEvent.objects.get(chain_seq=3)
    assert broken() == f"the audit chain is broken at event {forged.pk}: edited"


def test_retention_deletes_whole_segments_and_verify_still_holds() -> None:
    now = timezone.now()
    old = [{"action": "old", "actor_type": "system", "created_at": now - timedelta(days=100)}]
    chain_write(old * 4)
    chain_write([{"action": "recent", "actor_type": "system", "created_at": now}])
    # Written after a recent one, though older: it waits for the next run, with its segment.
    chain_write(old)
    chain_write([{"action": "recent", "actor_type": "system", "created_at": now}])

    assert audit_prune(days=90) == 4
    assert list(AuditEvent.objects.order_by("chain_seq").values_list("chain_seq", flat=True)) == [
        5,
        6,
        7,
    ]
    checkpoint = AuditCheckpoint.objects.get()
    assert (checkpoint.seq, checkpoint.deleted) == (4, 4)
    assert checkpoint.hash != GENESIS
    assert verify() == (
        "audit chain intact: 3 event(s), #5 to #7, after the retention checkpoint at #4\n"
    )
    # Pruning does not blind verification to what comes after the checkpoint.
    raw("UPDATE audit_auditevent SET action = 'recent' WHERE chain_seq = 6")
    sixth = AuditEvent.objects.get(chain_seq=6)
    assert broken() == f"the audit chain is broken at event {sixth.pk}: edited"


def test_verify_since_starts_from_that_time() -> None:
    events = some_events(4)
    raw("UPDATE audit_auditevent SET message = 'edited' WHERE id = %s", events[0].pk)
    cut = AuditEvent.objects.get(pk=events[2].pk).created_at
    assert verify("--since", cut.isoformat()) == "audit chain intact: 2 event(s), #3 to #4\n"
    assert broken() == f"the audit chain is broken at event {events[0].pk}: edited"
    later = (timezone.now() + timedelta(hours=1)).isoformat()
    assert verify("--since", later) == "audit chain intact: no events to check\n"
    with pytest.raises(CommandError, match="a date, an ISO 8601 time or a duration"):
        verify("--since", "yesterday-ish")


def test_the_listing_still_works_without_a_subcommand() -> None:
    some_events(2)
    out = StringIO()
    call_command("audit", "--json", "--limit", "1", stdout=out)
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["message"] == "change 1"


def export(*args: str) -> list[str]:
    out = StringIO()
    call_command("audit", "export", *args, stdout=out)
    return out.getvalue().splitlines()


def test_export_streams_jsonl_and_cef_in_write_order() -> None:
    now = timezone.now()
    chain_write(
        [
            {"action": "old", "actor_type": "system", "created_at": now - timedelta(days=3)},
            {"action": "policy.denied", "actor_type": "agent", "actor": "bob", "agent": "bob",
             "created_at": now, "message": "a=b | c\nd\\e", "status": 403,
             "client_address": "10.0.0.7", "path": "/v1/messages"},
        ]
    )  # fmt: skip
    lines = [json.loads(line) for line in export("--format", "jsonl")]
    assert [e["action"] for e in lines] == ["old", "policy.denied"]
    assert [e["chain_seq"] for e in lines] == [1, 2]
    assert lines[1]["chain_hash"] == AuditEvent.objects.get(chain_seq=2).chain_hash
    assert [json.loads(line)["action"] for line in export("--since", "1d")] == ["policy.denied"]
    assert [json.loads(line)["action"] for line in export("--until", "1d")] == ["old"]

    (cef,) = export("--format", "cef", "--since", "1d")
    *header, extension = cef.split("|", 7)
    assert header == ["CEF:0", "keybroker", "keybroker", "0.1.0", "policy.denied",
                      "policy.denied", "5"]  # fmt: skip
    assert r"msg=a\=b | c\nd\\e" in extension
    assert "cs1Label=agent cs1=bob" in extension
    assert "src=10.0.0.7" in extension
    assert "request=/v1/messages" in extension
    assert "cn1Label=status cn1=403" in extension
    assert "cn2Label=chainSeq cn2=2" in extension
    assert "cs3Label" not in extension  # no model: neither value nor label
    with pytest.raises(CommandError):
        export("--format", "csv")


@pytest.fixture
def udp_listener() -> Iterator[socket.socket]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(10)
    yield listener
    listener.close()


def test_the_syslog_sink_sends_each_committed_event_over_udp(
    udp_listener: socket.socket, settings: Any
) -> None:
    settings.AUDIT_SYSLOG = f"udp://127.0.0.1:{udp_listener.getsockname()[1]}"
    event = audit_record(action="backend.added", backend="anthropic")
    with pytest.raises(RuntimeError):
        recorded_then_rolled_back()  # never sent
    denied = audit_record(action="auth.failed", message="bad vend token")

    first, second = (udp_listener.recv(65536).decode() for _ in range(2))
    # RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG
    match = re.fullmatch(r"<(\d+)>1 (\S+Z) (\S+) keybroker (\d+) backend\.added - (.*)", first)
    assert match, first
    assert int(match[1]) == 10 * 8 + 6  # authpriv, informational
    body = json.loads(match[5])
    assert (body["id"], body["chain_seq"], body["chain_hash"]) == (
        event.pk,
        1,
        AuditEvent.objects.get(pk=event.pk).chain_hash,
    )
    assert second.startswith(f"<{10 * 8 + 4}>1 ")  # a failed login is a warning
    assert json.loads(second.split(" - ", 1)[1])["id"] == denied.pk
    wait_until(lambda: audit_sink_stats().sent == 2, timeout=5, what="both counted as sent")


def test_a_sink_that_cannot_send_counts_it_and_the_row_is_stored(settings: Any) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every TCP connect is refused
    settings.AUDIT_SYSLOG = f"tcp://127.0.0.1:{port}"
    failed = audit_sink_stats().failed
    audit_record(action="backend.added", backend="anthropic")
    assert AuditEvent.objects.filter(action="backend.added").exists()
    wait_until(lambda: audit_sink_stats().failed > failed, timeout=5, what="the failure counted")


def test_the_syslog_sink_sends_over_tcp_one_line_each(settings: Any) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    settings.AUDIT_SYSLOG = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    received: list[bytes] = []

    def accept() -> None:
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(10)
            while received.count(b"\n") < 2 and (data := peer.recv(65536)):
                received.extend(data[i : i + 1] for i in range(len(data)))

    reader = threading.Thread(target=accept)
    reader.start()
    some_events(2)
    reader.join(timeout=15)
    listener.close()
    lines = b"".join(received).decode().splitlines()
    assert len(lines) == 2
    assert all(" keybroker " in line and '"action":"backend.updated"' in line for line in lines)


def test_two_web_processes_writing_at_once_keep_one_intact_chain(
    proxied: Proxied, second_process: str, live_url: str
) -> None:
    """Proxied calls through this process and another uvicorn process at the same time;
    each writes its own batches, and the chain has every event once, in one order."""
    calls_each = 30

    def call(base: str) -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(calls_each):
                response = client.post(
                    f"{base}/v1/proxy/anthropic/v1/messages",
                    headers={"x-api-key": proxied.token, "anthropic-version": "2023-06-01"},
                    json={"model": "claude-haiku-4-5", "max_tokens": 8,
                          "messages": [{"role": "user", "content": "Hello"}]},
                )  # fmt: skip
                assert response.status_code == 200

    threads = [threading.Thread(target=call, args=(base,)) for base in (live_url, second_process)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    def written() -> bool:
        return AuditEvent.objects.filter(action="proxy.request").count() == 2 * calls_each

    wait_until(written, timeout=20, what="both processes to write their events")
    result = chain_verify()
    assert result.intact, result.breaks
    places = list(AuditEvent.objects.order_by("chain_seq").values_list("chain_seq", flat=True))
    assert places == list(range(1, AuditEvent.objects.count() + 1))


def test_manage_py_audit_verify_as_a_process_exits_1_naming_the_edited_row() -> None:
    events = some_events(3)
    command = [sys.executable, "manage.py", "audit", "verify"]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=120
        )

    intact = run()
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip() == "audit chain intact: 3 event(s), #1 to #3"
    raw("UPDATE audit_auditevent SET backend = 'elsewhere' WHERE id = %s", events[1].pk)
    edited = run()
    assert edited.returncode == 1
    assert f"the audit chain is broken at event {events[1].pk}: edited" in edited.stderr


def test_the_migration_chains_the_events_written_before_it() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([("audit", "0004_cost_usd")])
    before = executor.loader.project_state([("audit", "0004_cost_usd")]).apps
    old_model = before.get_model("audit", "AuditEvent")
    for number in range(3):
        old_model.objects.create(
            action="backend.added", actor_type="system", message=f"before {number}",
            created_at=timezone.now(), detail={"n": number, "ratio": 2.0},
        )  # fmt: skip
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    assert list(AuditEvent.objects.order_by("id").values_list("chain_seq", flat=True)) == [1, 2, 3]
    audit_record(action="backend.updated")  # the chain goes on from the migrated head
    assert verify() == "audit chain intact: 4 event(s), #1 to #4\n"
