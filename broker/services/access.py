"""Who may do what: the checks every agent-facing entry point shares."""

from __future__ import annotations

from broker.errors import NotPermitted
from broker.models import Agent, AgentStatus


def agent_require_approved(agent: Agent) -> None:
    if agent.status == AgentStatus.PENDING:
        raise NotPermitted(f"agent {agent.name} is pending approval by an admin")
    if agent.status != AgentStatus.APPROVED:
        raise NotPermitted(f"agent {agent.name} was {agent.status}")
