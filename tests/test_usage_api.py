"""Reading usage: the admin API, an agent's own (and never another's), `manage.py usage`."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from audit.models import UsageCursor, UsageRollup
from audit.rollups import usage_rollup
from broker.models import Agent
from broker.services.agents import agent_enroll, agent_unenroll
from tests.agents import as_agent
from tests.usage_cast import call, refused

pytestmark = pytest.mark.django_db

URL = "/v1/admin/usage/"


@pytest.fixture
def cast(alice: AbstractBaseUser) -> dict[str, Any]:
    """Bob and carol, each with calls in the last minutes; an old bob who unenrolled."""
    now = timezone.now()
    old_bob = agent_enroll(name="bob", scopes=[], approved_by=alice).agent
    call(old_bob, input_tokens=500, cost_usd=Decimal("5"), created_at=now)
    agent_unenroll(agent=old_bob)
    bob = agent_enroll(name="bob", scopes=[], approved_by=alice)
    carol = agent_enroll(name="carol", scopes=[], approved_by=alice)
    for _ in range(3):
        call(bob.agent, input_tokens=10, output_tokens=2, cost_usd=Decimal("0.01"), created_at=now)
    call(bob.agent, model="claude-sonnet-4-5", input_tokens=1, created_at=now)  # unpriced
    refused(bob.agent, created_at=now)
    call(carol.agent, input_tokens=99, output_tokens=9, cache_read_tokens=7, created_at=now,
         cost_usd=Decimal("1.5"), backend="staging")  # fmt: skip
    usage_rollup()
    return {"bob": bob, "carol": carol, "old_bob": old_bob}


def test_admins_get_usage_grouped_by_agent_and_model(
    admin_api: Client, cast: dict[str, Any]
) -> None:
    response = admin_api.get(URL, {"group_by": "agent,model", "since": "1h"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["group_by"] == ["agent", "model"]
    assert body["rolled_up_at"] == UsageCursor.objects.get().updated_at.isoformat()
    assert body["totals"]["calls"] == 7
    assert body["totals"]["cost_usd"] == "6.530000"
    assert body["totals"]["cost_unknown_calls"] == 1
    rows = {(row["agent_id"], row["model"]): row for row in body["groups"]}
    bob = str(cast["bob"].agent.pk)
    assert rows[(bob, "claude-haiku-4-5")]["calls"] == 4  # three fine, one refused
    assert rows[(bob, "claude-haiku-4-5")]["refusals"] == 1
    assert rows[(bob, "claude-sonnet-4-5")]["cost_unknown_calls"] == 1
    assert rows[(bob, "claude-sonnet-4-5")]["cost_usd"] == "0.000000"
    old = rows[(str(cast["old_bob"].pk), "claude-haiku-4-5")]
    assert (old["agent"], old["agent_status"], old["input_tokens"]) == ("bob", "unenrolled", 500)
    assert rows[(bob, "claude-haiku-4-5")]["agent_status"] == "approved"
    carol = admin_api.get(URL, {"agent": "carol", "group_by": "backend"}).json()
    assert [(g["backend"], g["cache_read_tokens"]) for g in carol["groups"]] == [("staging", 7)]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"group_by": "agent,week"}, "group_by"),
        ({"group_by": "hour,day"}, "group_by"),
        ({"since": "last tuesday"}, "since"),
        ({"until": "2026-02-30"}, "until"),
        ({"since": "1h", "until": "3h"}, "until"),
        ({"agnet": "bob"}, "agnet"),
        ({"model": "m" * 201}, "model"),
    ],
)
def test_bad_queries_are_a_400_naming_the_field_and_change_nothing(
    admin_api: Client, cast: dict[str, Any], query: dict[str, str], field: str
) -> None:
    before = list(UsageRollup.objects.order_by("pk").values())
    response = admin_api.get(URL, query)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert field in error["fields"]
    assert error["message"].startswith(f"{field}: ")
    assert list(UsageRollup.objects.order_by("pk").values()) == before


def test_only_staff_who_may_view_the_trail_read_usage(client: Client, cast: dict[str, Any]) -> None:
    assert client.get(URL).status_code == 401
    charlie = get_user_model().objects.create_user(
        "charlie", password="charlie-pw-123", is_staff=True
    )
    client.login(username="charlie", password="charlie-pw-123")
    assert client.get(URL).status_code == 403
    assert client.get("/usage/").status_code == 403
    charlie.user_permissions.add(Permission.objects.get(codename="view_auditevent"))
    assert client.get(URL).status_code == 200
    assert client.get("/usage/").status_code == 200


def test_an_agent_sees_its_own_usage_and_never_another_agents(cast: dict[str, Any]) -> None:
    bob = as_agent(cast["bob"].vend_token)
    mine = bob.get("/v1/usage", {"group_by": "agent,backend"})
    assert mine.status_code == 200, mine.content
    body = mine.json()
    assert {g["agent_id"] for g in body["groups"]} == {str(cast["bob"].agent.pk)}
    assert body["totals"]["calls"] == 5  # not the old bob's, nor carol's
    assert "carol" not in mine.content.decode()
    # Asking for carol's, by name or id, is refused, not quietly answered.
    for other in ("carol", str(cast["carol"].agent.pk)):
        refused_query = bob.get("/v1/usage", {"agent": other})
        assert refused_query.status_code == 400
        assert "agent" in refused_query.json()["error"]["fields"]
    # Filters narrow within its own calls only.
    assert bob.get("/v1/usage", {"backend": "staging"}).json()["totals"]["calls"] == 0
    carol = as_agent(cast["carol"].vend_token).get("/v1/usage").json()
    assert (carol["totals"]["calls"], carol["totals"]["input_tokens"]) == (1, 99)
    assert Client().get("/v1/usage").status_code == 401
    bad = bob.get("/v1/usage", {"group_by": "agent,week"})
    assert (bad.status_code, list(bad.json()["error"]["fields"])) == (400, ["group_by"])


def test_an_unenrolled_agent_reads_nothing(cast: dict[str, Any]) -> None:
    bob = cast["bob"]
    agent_unenroll(agent=Agent.objects.get(pk=bob.agent.pk))
    assert as_agent(bob.vend_token).get("/v1/usage").status_code == 401


def test_the_command_prints_a_table_and_the_apis_json(cast: dict[str, Any]) -> None:
    out = io.StringIO()
    call_command("usage", "--by", "agent,model", "--since", "1d", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("(UTC)")
    assert lines[1].split()[:3] == ["AGENT", "MODEL", "CALLS"]
    old = str(cast["old_bob"].pk)[:8]
    assert any(line.startswith(f"bob (unenrolled, {old})  claude-haiku-4-5") for line in lines)
    sonnet = next(line for line in lines if "claude-sonnet-4-5" in line)
    assert "0.000000 +1 unknown" in sonnet
    assert lines[-1].split()[:2] == ["TOTAL", "7"]

    out = io.StringIO()
    call_command("usage", "--by", "backend", "--json", stdout=out)
    data = json.loads(out.getvalue())
    assert {g["backend"]: g["calls"] for g in data["groups"]} == {"anthropic": 6, "staging": 1}

    with pytest.raises(CommandError, match="group_by: any of agent, backend"):
        call_command("usage", "--by", "weekday")


def test_refresh_counts_what_the_worker_has_not_yet(cast: dict[str, Any]) -> None:
    call(cast["carol"].agent, input_tokens=1, created_at=timezone.now())
    out = io.StringIO()
    call_command("usage", "--json", stdout=out)
    assert json.loads(out.getvalue())["totals"]["calls"] == 7
    out = io.StringIO()
    call_command("usage", "--json", "--refresh", stdout=out)
    assert json.loads(out.getvalue())["totals"]["calls"] == 8
