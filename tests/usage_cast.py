"""Proxied calls in the trail as the recorder writes them, for the usage tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser

from audit.models import AuditEvent
from broker.models import Agent
from broker.services.agents import agent_enroll

NOW = datetime(2026, 12, 7, 14, 30, tzinfo=UTC)


def agent(name: str, alice: AbstractBaseUser) -> Agent:
    return agent_enroll(name=name, scopes=[], approved_by=alice).agent


def call(who: Agent | None, **fields: Any) -> AuditEvent:
    """A proxied call as the recorder writes it: allowed and fine unless told otherwise."""
    fields.setdefault("action", "proxy.request")
    fields.setdefault("backend", "anthropic")
    fields.setdefault("model", "claude-haiku-4-5")
    fields.setdefault("status", 200)
    fields.setdefault("outcome", "ok")
    fields.setdefault("policy_result", "allowed" if who else "denied")
    fields.setdefault("created_at", NOW - timedelta(minutes=5))
    return AuditEvent.objects.create(
        actor_type="agent" if who else "system",
        agent=who.name if who else "",
        agent_id=who.pk if who else None,
        **fields,
    )


def refused(who: Agent | None, **fields: Any) -> AuditEvent:
    fields.setdefault("status", 429)
    return call(who, action="policy.denied", outcome="denied", policy_result="denied", **fields)
