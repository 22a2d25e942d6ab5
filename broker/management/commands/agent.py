"""`manage.py agent ls|pending|approve|reject|unenroll|create|grant|grants|defaults`, and
`grant-identity|revoke-identity|identities` for identity tokens (workload identity)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from broker.management.commands._output import as_json, service_errors, table
from broker.models import Agent, AgentStatus, Grant
from broker.selectors.agents import agents_waiting
from broker.services.agents import (
    agent_approve,
    agent_enroll,
    agent_get,
    agent_reject,
    agent_scopes,
    agent_unenroll,
    agent_ungrant,
)
from broker.services.backends import backend_get
from broker.services.identity import identity_grant, identity_grants_of, identity_revoke
from broker.services.oidc import issuer
from broker.services.policy import (
    BACKEND_COLUMNS,
    POLICY_FIELDS,
    USD_FIELDS,
    backend_defaults,
    backend_policy_update,
    grant_describe,
    grant_set,
    grants_of,
    hold_text,
    policy_parse_texts,
    usd_text,
)
from keybroker.wire import duration_format

# The policy flags of `agent grant` and `agent defaults`: blank or "default" unsets one.
POLICY_FLAGS = {
    "models": ("GLOB,…", "allowed models, e.g. claude-haiku-*,claude-sonnet-4-*"),
    "paths": ("GLOB,…", "allowed upstream paths (* in a segment, ** across): /v1/messages/**"),
    "rpm": ("N", "requests per minute"),
    "tpm": ("N", "input + output tokens per minute"),
    "daily_tokens": ("N", "tokens per UTC day"),
    "daily_usd": ("USD", "US dollars per UTC day (25.00), from each call's cost"),
    "monthly_usd": ("USD", "US dollars per UTC calendar month, from each call's cost"),
    "max_tokens": ("N", "cap on a request's max_tokens"),
    "max_concurrent": ("N", "calls in flight at once (per proxy process)"),
    "max_ttl": ("TTL", "longest token minted for it (90s, 30m, 1h); at most the backend's"),
    "hold": (
        "RULE",
        "calls a person must approve on the activity page: 'all; timeout=2m' or "
        "'models=claude-opus-*; paths=/v1/messages/batches**; max_tokens_above=4000'",
    ),
}


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else ""


def _scopes(option: str | None) -> list[str] | None:
    return None if option is None else [s.strip() for s in option.split(",") if s.strip()]


def _policy_flags(parser: CommandParser, *, for_grant: bool = True) -> None:
    for name, (metavar, text) in POLICY_FLAGS.items():
        if name not in BACKEND_COLUMNS and not for_grant:
            continue
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, metavar=metavar, help=f"{text}; 'default' unsets")


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(value) or "-"
    if name in USD_FIELDS:
        return f"${usd_text(Decimal(value))}"
    if name == "hold":
        return hold_text(value)
    return duration_format(value) if name == "max_ttl" else str(value)


def _policy_line(values: dict[str, Any]) -> str:
    set_ = [f"{name} {_shown(name, value)}" for name, value in values.items() if value]
    return "; ".join(set_) or "no limits"


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
        grant = sub.add_parser(
            "grant", help="let an agent mint tokens for a backend, or change that grant's policy"
        )
        grant.add_argument("name")
        grant.add_argument("backend")
        _policy_flags(grant)
        ungrant = sub.add_parser(
            "ungrant", help="take a backend away; the agent's tokens for it die at once"
        )
        ungrant.add_argument("name")
        ungrant.add_argument("backend")
        grants = sub.add_parser("grants", help="list an agent's grants and their policy")
        grants.add_argument("name")
        grants.add_argument("--json", action="store_true")
        defaults = sub.add_parser(
            "defaults", help="policy defaults for every grant on a backend (a grant's own wins)"
        )
        defaults.add_argument("backend")
        _policy_flags(defaults, for_grant=False)
        identity = sub.add_parser(
            "grant-identity",
            help="let an agent get identity tokens (JWTs) for an audience, e.g. Anthropic's "
            "workload identity federation; again changes the lifetime",
        )
        identity.add_argument("name")
        identity.add_argument("--audience", required=True, metavar="URL")
        identity.add_argument(
            "--lifetime", metavar="TTL", help="how long each token lives (default 10m, 1m to 1h)"
        )
        revoke = sub.add_parser("revoke-identity", help="no more identity tokens for an audience")
        revoke.add_argument("name")
        revoke.add_argument("--audience", required=True, metavar="URL")
        identities = sub.add_parser("identities", help="the audiences an agent may get tokens for")
        identities.add_argument("name")
        identities.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        with service_errors():
            getattr(self, f"do_{options['action'].replace('-', '_')}")(**options)

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
        waiting = agents_waiting()
        self.stdout.write(self._rows(waiting) if waiting else "nothing waits for approval")

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
        live = agent.tokens.live().count()
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
        changes = policy_parse_texts({name: options[name] for name in POLICY_FIELDS})
        grant = grant_set(agent=agent, backend=backend_get(name=options["backend"]), policy=changes)
        effective = grant_describe(grant)["effective"]
        self.stdout.write(
            f"{agent.name} may now mint tokens for {grant.backend.name}; "
            f"policy: {_policy_line(effective)}"
        )

    def do_ungrant(self, **options: Any) -> None:
        agent = agent_get(name=options["name"])
        revoked = agent_ungrant(agent=agent, backend=backend_get(name=options["backend"]))
        self.stdout.write(
            f"{agent.name} may no longer use {options['backend']} ({revoked} token(s) revoked)"
        )

    def do_grants(self, **options: Any) -> None:
        agent = agent_get(name=options["name"])
        grants = grants_of(agent)
        if options["json"]:
            self.stdout.write(as_json([grant_describe(grant) for grant in grants]))
            return
        self.stdout.write(self._grant_rows(grants) if grants else "no grants")

    def _grant_rows(self, grants: list[Grant]) -> str:
        rows = []
        for grant in grants:
            described = grant_describe(grant)
            cells = []
            for name in POLICY_FIELDS:
                cell = _shown(name, described["effective"][name])
                # A value the grant takes from its backend says so.
                if described["sources"][name] == "backend" and described["policy"][name] is None:
                    cell += " (backend)"
                cells.append(cell)
            rows.append((grant.backend.name, *cells, _when(grant.created_at)))
        headers = ["BACKEND", "MODELS", "PATHS", "RPM", "TPM", "DAILY TOKENS", "DAILY USD",
                   "MONTHLY USD", "MAX TOKENS", "MAX CONCURRENT", "MAX TTL", "HOLD",
                   "GRANTED"]  # fmt: skip
        return table(rows, headers)

    def do_defaults(self, **options: Any) -> None:
        backend = backend_get(name=options["backend"])
        changes = policy_parse_texts({name: options[name] for name in BACKEND_COLUMNS})
        backend = backend_policy_update(backend=backend, policy=changes)
        self.stdout.write(
            f"defaults for grants on {backend.name}: {_policy_line(backend_defaults(backend))}"
        )

    def do_grant_identity(self, **options: Any) -> None:
        agent = agent_get(name=options["name"])
        grant = identity_grant(
            agent=agent, audience=options["audience"], lifetime=options["lifetime"]
        )
        self.stdout.write(
            f"{agent.name} may now get identity tokens for {grant.audience}, each valid for "
            f"{duration_format(grant.lifetime)} (sub {agent.pk}, iss {issuer()})"
        )

    def do_revoke_identity(self, **options: Any) -> None:
        agent = agent_get(name=options["name"])
        identity_revoke(agent=agent, audience=options["audience"])
        self.stdout.write(
            f"{agent.name} gets no more identity tokens for {options['audience'].strip()}; "
            "those issued live out their lifetime"
        )

    def do_identities(self, **options: Any) -> None:
        agent = agent_get(name=options["name"])
        grants = identity_grants_of(agent)
        if options["json"]:
            from broker.api.admin_agents import IdentityGrantOutput

            self.stdout.write(as_json(IdentityGrantOutput(grants, many=True).data))
            return
        rows = [(g.audience, duration_format(g.lifetime), _when(g.created_at)) for g in grants]
        self.stdout.write(
            table(rows, ["AUDIENCE", "LIFETIME", "GRANTED"]) if rows else "no identity grants"
        )
