"""`manage.py agent ls|pending|approve|reject|unenroll|create|grant|grants`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from broker.management.commands._output import as_json, service_errors, table
from broker.models import Agent, AgentStatus
from broker.services.agents import (
    agent_approve,
    agent_enroll,
    agent_get,
    agent_grant,
    agent_reject,
    agent_scopes,
    agent_unenroll,
    agents_pending,
)
from broker.services.backends import backend_get


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else ""


def _scopes(option: str | None) -> list[str] | None:
    return None if option is None else [s.strip() for s in option.split(",") if s.strip()]


class Command(BaseCommand):
    help = "Manage agents: approve enrollments, grant backends, unenroll."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        ls = sub.add_parser("ls", help="list agents")
        ls.add_argument("--status", choices=AgentStatus.values)
        ls.add_argument("--json", action="store_true")
        sub.add_parser("pending", help="agents waiting for a decision")
        approve = sub.add_parser("approve", help="approve an agent (grants what it asked for)")
        approve.add_argument("name")
        approve.add_argument(
            "--scopes", help="grant only these backends, comma-separated (default: all asked)"
        )
        reject = sub.add_parser("reject", help="reject a pending agent or its extra scopes")
        reject.add_argument("name")
        reject.add_argument("--reason", default="")
        unenroll = sub.add_parser("unenroll", help="unenroll: the agent and its tokens die")
        unenroll.add_argument("name")
        create = sub.add_parser("create", help="create an approved agent; prints its vend token")
        create.add_argument("name")
        create.add_argument("--can", action="append", default=[], metavar="BACKEND")
        create.add_argument("--description", default="")
        grant = sub.add_parser("grant", help="let an agent mint tokens for a backend")
        grant.add_argument("name")
        grant.add_argument("backend")
        grants = sub.add_parser("grants", help="list an agent's grants")
        grants.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        with service_errors():
            getattr(self, f"do_{options['action']}")(**options)

    def _rows(self, agents: list[Agent]) -> str:
        rows = [
            (a.name, a.status, ",".join(agent_scopes(a)), ",".join(a.requested_scopes),
             _when(a.created_at), _when(a.last_seen_at), str(a.pk))
            for a in agents
        ]  # fmt: skip
        headers = ["NAME", "STATUS", "SCOPES", "REQUESTED", "ENROLLED", "LAST SEEN", "ID"]
        return table(rows, headers)

    def do_ls(self, **options: Any) -> None:
        agents = Agent.objects.all()
        if options["status"]:
            agents = agents.filter(status=options["status"])
        if options["json"]:
            from broker.api.admin_agents import AgentOutput

            self.stdout.write(as_json(AgentOutput(agents, many=True).data))
            return
        self.stdout.write(self._rows(list(agents)) if agents else "no agents yet")

    def do_pending(self, **options: Any) -> None:
        pending = agents_pending()
        self.stdout.write(self._rows(pending) if pending else "nothing waits for approval")

    def do_approve(self, **options: Any) -> None:
        agent = agent_approve(
            agent=agent_get(name=options["name"]), by=None, scopes=_scopes(options["scopes"])
        )
        granted = ", ".join(agent_scopes(agent)) or "nothing"
        self.stdout.write(f"approved {agent.name}; it may use: {granted}")

    def do_reject(self, **options: Any) -> None:
        agent = agent_reject(
            agent=agent_get(name=options["name"]), by=None, reason=options["reason"]
        )
        self.stdout.write(f"rejected {agent.name}" if agent.status == AgentStatus.REJECTED
                          else f"declined the extra scopes {agent.name} asked for")  # fmt: skip

    def do_unenroll(self, **options: Any) -> None:
        agent = agent_get(name=options["name"])
        live = agent.tokens.filter(revoked_at__isnull=True).count()
        agent_unenroll(agent=agent)
        self.stdout.write(f"unenrolled {agent.name}; its tokens are revoked ({live} were open)")

    def do_create(self, **options: Any) -> None:
        created = agent_enroll(
            name=options["name"], scopes=options["can"], description=options["description"]
        )
        agent = agent_approve(agent=created.agent, by=None)
        granted = ", ".join(agent_scopes(agent)) or "nothing"
        self.stderr.write(
            f"created {agent.name} (approved; may use: {granted}). "
            "Its vend token follows; it is shown only this once:"
        )
        self.stdout.write(created.vend_token)

    def do_grant(self, **options: Any) -> None:
        agent = agent_get(name=options["name"])
        agent_grant(agent=agent, backend=backend_get(name=options["backend"]))
        self.stdout.write(f"{agent.name} may now mint tokens for {options['backend']}")

    def do_grants(self, **options: Any) -> None:
        agent = agent_get(name=options["name"])
        rows = [
            (g.backend.name, _when(g.created_at),
             g.created_by.get_username() if g.created_by else "")
            for g in agent.grants.select_related("backend", "created_by")
        ]  # fmt: skip
        self.stdout.write(table(rows, ["BACKEND", "GRANTED", "BY"]) if rows else "no grants")
