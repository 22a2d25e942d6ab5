"""Reading the trail: the admin REST API and its exports, the CLI, the admin list and the page."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from audit import api as audit_api
from audit.events import EVENT_FIELDS
from audit.models import AuditEvent
from audit.services import audit_record
from broker.services.admin_tokens import admintoken_create

pytestmark = pytest.mark.django_db

URL = "/v1/admin/audit/"


def event(**fields: Any) -> AuditEvent:
    fields.setdefault("actor_type", "agent")
    fields.setdefault("action", "proxy.request")
    return AuditEvent.objects.create(**fields)


@pytest.fixture
def trail() -> dict[str, AuditEvent]:
    """A small history: bob's calls, carol's refusal, an old one, an admin action."""
    now = timezone.now()
    return {
        "old": event(
            agent="bob", backend="anthropic", status=200, created_at=now - timedelta(days=3)
        ),
        "ok": event(
            agent="bob",
            backend="anthropic",
            status=200,
            model="claude-haiku-4-5",
            input_tokens=12,
            output_tokens=6,
            request_id="req_ok",
            token_id="t-1",
            token_prefix="crd_AbCdEfGh",
            created_at=now - timedelta(minutes=5),
        ),
        "limited": event(
            agent="bob", backend="staging", status=429, created_at=now - timedelta(minutes=4)
        ),
        "denied": event(
            action="policy.denied",
            agent="carol",
            backend="anthropic",
            status=403,
            policy_result="denied",
            created_at=now - timedelta(minutes=3),
        ),
        "revoked": event(
            action="token.revoked",
            actor_type="admin",
            actor="alice",
            agent="bob",
            token_id="t-1",
            created_at=now - timedelta(minutes=2),
        ),
    }


def ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def test_the_list_is_newest_first_and_every_filter_narrows_it(
    admin_api: Client, trail: dict[str, AuditEvent]
) -> None:
    t = {name: e.pk for name, e in trail.items()}
    token_created = AuditEvent.objects.get(action="admintoken.created").pk  # by admin_api
    assert ids(admin_api.get(URL)) == [
        token_created, t["revoked"], t["denied"], t["limited"], t["ok"], t["old"],
    ]  # fmt: skip
    assert ids(admin_api.get(URL, {"agent": "carol"})) == [t["denied"]]
    assert ids(admin_api.get(URL, {"backend": "staging"})) == [t["limited"]]
    assert ids(admin_api.get(URL, {"action": "token.*"})) == [t["revoked"]]
    assert ids(admin_api.get(URL, {"action": "policy.denied,token.revoked"})) == [
        t["revoked"],
        t["denied"],
    ]
    assert ids(admin_api.get(URL, {"status": "4xx"})) == [t["denied"], t["limited"]]
    assert ids(admin_api.get(URL, {"status": "429"})) == [t["limited"]]
    assert ids(admin_api.get(URL, {"since": "1h", "agent": "bob"})) == [
        t["revoked"],
        t["limited"],
        t["ok"],
    ]
    until = (timezone.now() - timedelta(days=1)).isoformat()
    assert ids(admin_api.get(URL, {"until": until})) == [t["old"]]
    assert ids(admin_api.get(URL, {"token": "t-1"})) == [t["revoked"], t["ok"]]
    assert ids(admin_api.get(URL, {"token": "crd_AbCdEfGh"})) == [t["ok"]]
    row = admin_api.get(URL, {"model": "claude-haiku-4-5"}).json()["results"][0]
    assert set(row) == set(EVENT_FIELDS)
    assert (row["input_tokens"], row["output_tokens"], row["request_id"]) == (12, 6, "req_ok")


def test_the_cursor_walks_every_event_once_while_new_ones_arrive(admin_api: Client) -> None:
    earlier = list(AuditEvent.objects.values_list("id", flat=True))
    first = [audit_record(action="token.issued").pk for _ in range(7)]
    seen: list[int] = []
    url: str | None = f"{URL}?page_size=3"
    while url:
        page = admin_api.get(url).json()
        seen += [row["id"] for row in page["results"]]
        audit_record(action="token.issued")  # newer events do not shift the pages behind
        url = page["next"]
    assert seen == [*reversed(first), *earlier]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"agnet": "bob"}, "agnet: unknown field"),
        ({"since": "yesterday"}, "since: a date, an ISO 8601 time or a duration"),
        ({"status": "teapot"}, "status: a code such as 429 or a class such as 4xx"),
        ({"agent": "b" * 201}, "agent: at most 200 characters"),
        # Once a 404 and a quiet page of 100: found by tests/faults/test_hostile_input.py.
        ({"cursor": "x"}, "cursor: not a cursor from `next` or `previous`"),
        ({"page_size": "ten"}, "page_size: A valid integer is required."),
        ({"page_size": "0"}, "page_size: Ensure this value is greater than or equal to 1."),
    ],
)
def test_bad_filters_are_a_400_that_names_them(
    admin_api: Client, query: dict[str, str], message: str
) -> None:
    response = admin_api.get(URL, query)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"
    assert message in response.json()["error"]["message"]


def test_only_staff_read_the_trail(client: Client, trail: dict[str, AuditEvent]) -> None:
    assert client.get(URL).status_code == 401
    assert client.get(f"{URL}export.csv").status_code == 401
    get_user_model().objects.create_user("charlie", password="charlie-pw-123")
    client.login(username="charlie", password="charlie-pw-123")
    assert client.get(URL).status_code == 403
    assert client.get(f"{URL}export.jsonl").status_code == 403
    assert client.get("/activity/").status_code == 302  # to the admin's login


@pytest.mark.django_db(transaction=True)
def test_exports_stream_every_matching_event_oldest_first_as_csv_and_json_lines(
    live_url: str, alice: AbstractBaseUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_api, "EXPORT_CHUNK", 3)  # several chunks, and ties across them
    moment = timezone.now() - timedelta(minutes=1)
    AuditEvent.objects.bulk_create(
        [AuditEvent(action="proxy.request", actor_type="agent", agent="bob", created_at=moment,
                    request_id=f"req_{n}", status=200, detail={"n": n}) for n in range(8)]
    )  # fmt: skip
    event(agent="bob", path="=HYPERLINK(evil)", status=404)
    event(agent="carol", status=200)
    token = admintoken_create(name="export", username="alice").plaintext
    http = httpx.Client(base_url=live_url, headers={"Authorization": f"Bearer {token}"})

    jsonl = http.get(f"{URL}export.jsonl", params={"agent": "bob"})
    assert jsonl.headers["content-type"].startswith("application/jsonl")
    assert "attachment" in jsonl.headers["content-disposition"]
    rows = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [r["request_id"] for r in rows] == [f"req_{n}" for n in range(8)] + [""]
    assert rows[0]["detail"] == {"n": 0}
    assert rows[-1]["path"] == "=HYPERLINK(evil)"  # data as it is; only CSV needs quoting

    exported = http.get(f"{URL}export.csv", params={"agent": "bob"}, headers={"Accept": "text/csv"})
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert list(table[0]) == list(EVENT_FIELDS)
    assert [r["request_id"] for r in table] == [r["request_id"] for r in rows]
    assert json.loads(table[0]["detail"]) == {"n": 0}
    assert table[-1]["path"] == "'=HYPERLINK(evil)"  # a spreadsheet shows it, never runs it
    bad = http.get(f"{URL}export.csv", params={"cursor": "x"})
    assert (bad.status_code, bad.json()["error"]["message"]) == (
        400,
        "cursor: exports are not paginated",
    )


def test_the_cli_lists_filters_and_prints_json_lines(trail: dict[str, AuditEvent]) -> None:
    out = io.StringIO()
    call_command("audit", "--agent", "bob", "--since", "1h", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "TIME", "ACTION", "ACTOR", "AGENT", "BACKEND", "MODEL", "STATUS", "TOKENS", "MS", "MESSAGE",
    ]  # fmt: skip
    assert [line.split()[2] for line in lines[1:]] == [
        "token.revoked",
        "proxy.request",
        "proxy.request",
    ]
    assert "12/6" in lines[3]

    out = io.StringIO()
    call_command("audit", "--action", "policy.denied", "--json", stdout=out)
    (row,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (row["agent"], row["status"], row["policy_result"]) == ("carol", 403, "denied")

    out = io.StringIO()
    call_command("audit", "--limit", "2", stdout=out)
    assert len(out.getvalue().splitlines()) == 3
    with pytest.raises(CommandError, match="since: a date"):
        call_command("audit", "--since", "last week")
    with pytest.raises(CommandError, match="--limit"):
        call_command("audit", "--limit", "0")


def test_the_admin_list_filters_and_searches_and_changes_nothing(
    client: Client, alice: AbstractBaseUser, trail: dict[str, AuditEvent]
) -> None:
    client.force_login(alice)
    changelist = "/admin/audit/auditevent/"
    page = client.get(changelist, {"status_class": "4xx", "kind": "proxied", "agent": "bob"})
    assert page.status_code == 200
    assert list(page.context["cl"].result_list) == [trail["limited"]]
    found = client.get(changelist, {"q": "req_ok"}).context["cl"].result_list
    assert list(found) == [trail["ok"]]
    assert client.get(changelist, {"created_at__day": str(timezone.now().day)}).status_code == 200

    detail = client.get(f"{changelist}{trail['ok'].pk}/change/")
    assert detail.status_code == 200
    assert b'name="_save"' not in detail.content
    assert client.post(f"{changelist}{trail['ok'].pk}/change/", {"message": "x"}).status_code == 403
    assert client.get(f"{changelist}add/").status_code == 403
    assert client.post(f"{changelist}{trail['ok'].pk}/delete/", {"post": "yes"}).status_code == 403
    assert AuditEvent.objects.count() == 5


def test_the_activity_page_opens_with_the_latest_events_and_is_linked_from_the_admin(
    client: Client, alice: AbstractBaseUser, trail: dict[str, AuditEvent]
) -> None:
    client.force_login(alice)
    assert b'href="/activity/"' in client.get("/admin/").content
    page = client.get("/activity/")
    assert page.status_code == 200
    assert [e["id"] for e in page.context["kb_events"]][:2] == [
        trail["revoked"].pk,
        trail["denied"].pk,
    ]
    assert b'id="kb-initial"' in page.content
