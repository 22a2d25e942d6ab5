"""Audit events keyed by agent id (issue 20, item 9): a name is free again after its agent
unenrolls, and the next agent of that name must not inherit the first one's history."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.utils import timezone

from broker.models import Agent, Backend
from broker.services.agents import agent_enroll, agent_unenroll
from broker.services.tokens import token_issue

BEFORE = [("audit", "0004_cost_usd"), ("broker", "0010_usd_budgets")]
AFTER = [("audit", "0005_agent_id_and_usage"), ("broker", "0010_usd_budgets")]


def two_erins(alice: AbstractBaseUser) -> tuple[Agent, Agent]:
    first = agent_enroll(name="erin", scopes=["anthropic"], approved_by=alice).agent
    token_issue(agent=first, backend_name="anthropic")
    agent_unenroll(agent=first, by=alice)
    second = agent_enroll(name="erin", scopes=["anthropic"], approved_by=alice).agent
    return first, second


@pytest.mark.django_db
def test_the_agent_page_shows_and_links_this_agents_events_only(
    admin_client: Client, alice: AbstractBaseUser, anthropic: Backend
) -> None:
    _first, second = two_erins(alice)
    mine = token_issue(agent=second, backend_name="anthropic").token
    page = admin_client.get(f"/admin/broker/agent/{second.pk}/change/").content.decode()
    assert "agent.unenrolled" not in page  # the first erin's
    assert "token.issued" in page
    assert f"/admin/audit/auditevent/?agent_id={second.pk}" in page
    listed = admin_client.get(f"/admin/audit/auditevent/?agent_id={second.pk}")
    assert listed.status_code == 200
    rows = listed.context["cl"].result_list
    assert {event.agent_id for event in rows} == {second.pk}
    assert any(event.token_id == str(mine.pk) for event in rows)
    assert not any(event.action == "agent.unenrolled" for event in rows)


@pytest.mark.django_db
def test_the_audit_api_and_command_filter_by_agent_id(
    admin_api: Client, alice: AbstractBaseUser, anthropic: Backend
) -> None:
    first, second = two_erins(alice)
    by_name = admin_api.get("/v1/admin/audit/", {"agent": "erin"}).json()["results"]
    assert {row["agent_id"] for row in by_name} == {str(first.pk), str(second.pk)}
    by_id = admin_api.get("/v1/admin/audit/", {"agent_id": str(first.pk)}).json()["results"]
    assert {row["agent_id"] for row in by_id} == {str(first.pk)}
    assert "agent.unenrolled" in {row["action"] for row in by_id}
    bad = admin_api.get("/v1/admin/audit/", {"agent_id": "erin"})
    assert bad.status_code == 400
    assert bad.json()["error"]["fields"] == {"agent_id": ["an agent's id (a UUID)"]}


@pytest.mark.django_db(transaction=True)
def test_the_migration_gives_old_rows_the_id_of_the_agent_of_that_name_at_the_time() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    try:
        old = executor.loader.project_state(BEFORE).apps
        OldAgent = old.get_model("broker", "Agent")
        OldEvent = old.get_model("audit", "AuditEvent")
        start = timezone.now() - timedelta(days=3)

        def agent(name: str, days: int, status: str) -> object:
            created = OldAgent.objects.create(
                name=name, status=status, vend_digest=f"{name}{days}".ljust(64, "0"),
                vend_prefix="ckr_x",
            )  # fmt: skip
            OldAgent.objects.filter(pk=created.pk).update(created_at=start + timedelta(days=days))
            return created

        first = agent("erin", 0, "unenrolled")
        second = agent("erin", 1, "approved")
        frank = agent("frank", 0, "approved")
        for name, days in (("erin", 0.5), ("erin", 1.5), ("erin", 2), ("frank", 1), ("", 1)):
            OldEvent.objects.create(action="proxy.request", actor_type="agent", agent=name,
                                    created_at=start + timedelta(days=days))  # fmt: skip
        OldEvent.objects.create(action="agent.enrolled", actor_type="agent", agent="ghost",
                                created_at=start)  # fmt: skip

        executor.loader.build_graph()
        executor.migrate(AFTER)
        # The model as this migration left it: later ones add columns it does not have yet.
        AfterEvent = executor.loader.project_state(AFTER).apps.get_model("audit", "AuditEvent")

        ids = dict(AfterEvent.objects.values_list("created_at", "agent_id").filter(agent="erin"))
        assert ids == {
            start + timedelta(days=0.5): first.pk,
            start + timedelta(days=1.5): second.pk,
            start + timedelta(days=2): second.pk,
        }
        assert AfterEvent.objects.get(agent="frank").agent_id == frank.pk
        assert AfterEvent.objects.get(agent="").agent_id is None
        assert AfterEvent.objects.get(agent="ghost").agent_id is None  # no such agent
    finally:
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
