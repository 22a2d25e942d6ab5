"""The agent-side `keybroker` command, run as a real subprocess against a fake broker.

The fake speaks the HTTP contract of docs/agent-cli.md on a real socket, so these tests need
neither the database nor the real server; the end-to-end run against the real one lives apart.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from tests.conftest import REPO, clean_env, free_port, served
from tests.fake_anthropic import Receive, Scope, Send
from tests.waiting import wait_until

TTL_MIN, TTL_DEFAULT, TTL_MAX = 60, 600, 3600
BACKENDS = ("anthropic", "anthropic-staging")
ENROLL_HINT = "keybroker: not enrolled; run keybroker enroll URL --name N --can BACKEND\n"


def error(status: int, error_type: str, message: str) -> tuple[int, Any]:
    return status, {"error": {"type": error_type, "message": message}}


def parse_ttl(value: Any) -> int | None:
    match = re.fullmatch(r"(\d+)([smh]?)", str(value))
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]] if match else None


@dataclass
class Agent:
    id: int
    name: str
    vend_token: str
    requested: list[str]
    status: str = "pending"
    scopes: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "scopes": self.scopes,
            "requested_scopes": self.requested,
        }


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    authorization: str
    at: float


@dataclass
class FakeBroker:
    """The broker's agent API, with knobs for what the tests need it to do."""

    url: str = ""
    agents: dict[str, Agent] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    # Status polls answered "pending" before the verdict lands; None keeps it pending forever.
    polls_before_verdict: int | None = 0
    verdict: str = "approved"
    # Status codes for the first polls (429 carries Retry-After: 1) before real answers.
    failing_polls: list[int] = field(default_factory=list)
    base_url: str | None = None
    leaky_errors: bool = False  # a buggy server that echoes the caller's credential
    # OAuth client credentials (client_id -> secret) and the audiences identity tokens are
    # granted for, with their lifetime.
    clients: dict[str, str] = field(default_factory=dict)
    identity_audiences: set[str] = field(default_factory=set)
    identity_lifetime: int = 600
    identity_tokens: list[str] = field(default_factory=list)

    def reset(self) -> None:
        """Back to the defaults above, keeping only the address the server listens on."""
        for name, value in vars(FakeBroker(url=self.url)).items():
            setattr(self, name, value)

    def add_agent(self, name: str, status: str = "approved", scopes: tuple[str, ...] = ()) -> Agent:
        agent = Agent(
            id=len(self.agents) + 1,
            name=name,
            vend_token=f"ckr_{secrets.token_urlsafe(32)}",
            requested=list(scopes),
            status=status,
            scopes=list(scopes) if status == "approved" else [],
        )
        self.agents[agent.vend_token] = agent
        return agent

    def calls(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if (s.method, s.path) == (method, path)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            body: Any = dict(parse_qsl(raw.decode()))
        else:
            body = json.loads(raw) if raw else None
        auth = headers.get("authorization", "")
        self.seen.append(Seen(scope["method"], scope["path"], body, auth, time.monotonic()))
        extra: list[tuple[bytes, bytes]] = []
        status, payload = self.route(scope["method"], scope["path"], body, auth)
        if status == 429:
            extra.append((b"retry-after", b"1"))
        data = b"" if payload is None else json.dumps(payload).encode()
        head = [(b"content-type", b"application/json"), *extra] if data else extra
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": data})

    def route(self, method: str, path: str, body: Any, auth: str) -> tuple[int, Any]:
        if (method, path) == ("POST", "/v1/enroll"):
            return self.enroll(body)
        if (method, path) == ("POST", "/oauth/token"):
            return self.oauth_token(body)
        agent = self.agents.get(auth.removeprefix("Bearer "))
        if agent is None:
            detail = f" {auth}" if self.leaky_errors else ""
            return error(401, "authentication_error", f"invalid vend token{detail}")
        if (method, path) == ("GET", "/v1/enroll/status"):
            if self.failing_polls:
                code = self.failing_polls.pop(0)
                return error(code, "unavailable", f"try again ({code})")
            if self.polls_before_verdict is not None and agent.status == "pending":
                if self.polls_before_verdict == 0:
                    agent.status = self.verdict
                    agent.scopes = list(agent.requested) if self.verdict == "approved" else []
                self.polls_before_verdict -= 1
            return 200, agent.view()
        if (method, path) == ("DELETE", "/v1/self"):
            del self.agents[agent.vend_token]
            return 204, None
        if agent.status != "approved":
            return error(403, "permission_denied", f"agent {agent.name} is {agent.status}")
        return self.approved_route(agent, method, path, body)

    def enroll(self, body: Any) -> tuple[int, Any]:
        name, scopes = body["name"], body["scopes"]
        if any(a.name == name for a in self.agents.values()):
            return error(409, "conflict", f"an agent named {name} already exists")
        if unknown := [s for s in scopes if s not in BACKENDS]:
            return error(400, "invalid_request", f"unknown backend: {', '.join(unknown)}")
        agent = self.add_agent(name, status="pending", scopes=tuple(scopes))
        return 201, {**agent.view(), "vend_token": agent.vend_token}

    def approved_route(self, agent: Agent, method: str, path: str, body: Any) -> tuple[int, Any]:
        if (method, path) == ("GET", "/v1/status"):
            grants = [
                {
                    "backend": backend,
                    "base_url": f"{self.url}/v1/proxy/{backend}",
                    "ttl": {"min": TTL_MIN, "default": TTL_DEFAULT, "max": TTL_MAX},
                }
                for backend in agent.scopes
            ]
            return 200, {**agent.view(), "grants": grants}
        if (method, path) == ("POST", "/v1/request"):
            agent.requested = sorted({*agent.requested, *body["scopes"]})
            return 202, agent.view()
        if method == "POST" and path.startswith("/v1/credentials/"):
            return self.mint(agent, path.removeprefix("/v1/credentials/"), body)
        if (method, path) == ("POST", "/v1/clients"):
            client_id = f"kbc_{len(self.calls('POST', '/v1/clients'))}"  # this one included
            secret = f"cks_{secrets.token_urlsafe(32)}"
            self.clients[client_id] = secret
            return 201, {"client_id": client_id, "client_secret": secret, "token_endpoint": ""}
        if (method, path) == ("GET", "/v1/active"):
            return 200, [
                {k: t[k] for k in ("id", "backend", "prefix", "created_at", "expires_at")}
                | {"last_used_at": None}
                for t in self.tokens.values()
                if t["agent"] == agent.id
            ]
        if method == "DELETE" and path.startswith("/v1/active/"):
            token_id = path.removeprefix("/v1/active/")
            if self.tokens.get(token_id, {}).get("agent") != agent.id:
                return error(404, "not_found", f"no live token with id {token_id}")
            del self.tokens[token_id]
            return 204, None
        return error(404, "not_found", f"no route {method} {path}")

    def oauth_token(self, form: dict[str, str]) -> tuple[int, Any]:
        """RFC 6749's shape, like the real /oauth/token."""
        if self.clients.get(form.get("client_id", "")) != form.get("client_secret"):
            return 401, {"error": "invalid_client", "error_description": "unknown client"}
        audience = form.get("audience", "")
        if audience not in self.identity_audiences:
            return 400, {
                "error": "invalid_target",
                "error_description": f"agent bob may not get tokens for audience {audience}",
            }
        token = f"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib2IifQ.{secrets.token_urlsafe(64)}"
        self.identity_tokens.append(token)
        return 200, {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.identity_lifetime,
        }

    def mint(self, agent: Agent, backend: str, body: Any) -> tuple[int, Any]:
        if backend not in agent.scopes:
            return error(403, "permission_denied", f"{agent.name} has no grant for {backend}")
        ttl = parse_ttl(body.get("ttl", TTL_DEFAULT))
        if ttl is None or not TTL_MIN <= ttl <= TTL_MAX:
            return error(400, "invalid_request", f"ttl must be between 1m and 1h for {backend}")
        token_id = f"tok{len(self.tokens) + 1}"
        secret = f"crd_{secrets.token_urlsafe(32)}"
        self.tokens[token_id] = {
            "id": token_id,
            "agent": agent.id,
            "backend": backend,
            "token": secret,
            "prefix": secret[:10],
            "created_at": "2030-01-01T00:00:00Z",
            "expires_at": "2030-01-01T00:30:00Z",
        }
        return 201, {
            "id": token_id,
            "token": secret,
            "backend": backend,
            "expires_at": "2030-01-01T00:30:00Z",
            "ttl": ttl,
            "base_url": self.base_url or f"{self.url}/v1/proxy/{backend}",
        }


@pytest.fixture(scope="module")
def _broker_server() -> Iterator[FakeBroker]:
    fake = FakeBroker()
    with served(fake) as fake.url:
        yield fake


@pytest.fixture
def broker(_broker_server: FakeBroker) -> FakeBroker:
    _broker_server.reset()
    return _broker_server


@dataclass
class Cli:
    """Runs `python -m keybroker.cli` in a clean environment whose home is tmp_path."""

    env: dict[str, str]
    config: Path
    outputs: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, umask: int = 0o022
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "keybroker.cli", *args],
            env={**self.env, **(env or {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            umask=umask,
        )
        self.outputs += [result.stdout, result.stderr]
        return result

    def write_config(self, url: str, agent: Agent) -> None:
        self.config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.write_text(
            json.dumps(
                {
                    "url": url,
                    "name": agent.name,
                    "agent_id": agent.id,
                    "vend_token": agent.vend_token,
                }
            )
        )
        self.config.chmod(0o600)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "home"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "ANTHROPIC_API_KEY"):
        env.pop(name, None)
        env.pop(name.lower(), None)
    return Cli(env=env, config=tmp_path / "xdg" / "keybroker" / "config.json")


@pytest.fixture
def bob(broker: FakeBroker, cli: Cli) -> Agent:
    """An approved agent whose config is in place, as after a successful `keybroker enroll`."""
    agent = broker.add_agent("bob", scopes=("anthropic",))
    cli.write_config(broker.url, agent)
    return agent


def enroll(
    cli: Cli, broker: FakeBroker, *extra: str, umask: int = 0o022
) -> subprocess.CompletedProcess[str]:
    return cli("enroll", broker.url, "--name", "bob", "--can", "anthropic", *extra, umask=umask)


def only_line(text: str) -> str:
    assert text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


# --- enroll ----------------------------------------------------------------------------------


def test_enroll_waits_while_pending_then_reports_the_approval(broker: FakeBroker, cli: Cli) -> None:
    broker.polls_before_verdict = 2
    result = enroll(cli, broker, "--description", "ci runner", "--poll-interval", "0.1")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "bob is approved for: anthropic\n"
    assert result.stderr == (
        f"keybroker: enrolled as bob (id 1); waiting up to 10m for an admin to approve it at "
        f"{broker.url}/admin/\n"
    )
    [posted] = broker.calls("POST", "/v1/enroll")
    assert posted.body == {"name": "bob", "scopes": ["anthropic"], "description": "ci runner"}
    [agent] = broker.agents.values()
    polls = broker.calls("GET", "/v1/enroll/status")
    assert len(polls) == 3
    assert {p.authorization for p in polls} == {f"Bearer {agent.vend_token}"}
    assert json.loads(cli.config.read_text()) == {
        "url": broker.url,
        "name": "bob",
        "agent_id": 1,
        "vend_token": agent.vend_token,
    }
    assert agent.vend_token not in result.stdout + result.stderr


def test_the_config_is_private_whatever_the_umask(broker: FakeBroker, cli: Cli) -> None:
    result = enroll(cli, broker, "--timeout", "0", umask=0)

    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(cli.config.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    assert sorted(p.name for p in cli.config.parent.iterdir()) == ["config.json"]


def test_a_rejected_agent_exits_3(broker: FakeBroker, cli: Cli) -> None:
    broker.polls_before_verdict, broker.verdict = 1, "rejected"
    result = enroll(cli, broker, "--poll-interval", "0.1")

    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == "keybroker: an admin rejected bob; it gets no tokens"
    assert cli.config.exists()


def test_a_timeout_keeps_the_enrollment_and_the_same_command_resumes(
    broker: FakeBroker, cli: Cli
) -> None:
    broker.polls_before_verdict = None
    started = time.monotonic()
    result = enroll(cli, broker, "--timeout", "1", "--poll-interval", "0.2")
    elapsed = time.monotonic() - started

    assert result.returncode == 4
    assert 1 <= elapsed < 10
    assert result.stderr.splitlines()[-1] == (
        f"keybroker: bob is still pending after 1s; the enrollment is kept in {cli.config}: "
        "run the same keybroker enroll again to keep waiting"
    )
    assert len(broker.calls("GET", "/v1/enroll/status")) >= 3  # it kept polling meanwhile

    broker.polls_before_verdict = 0
    resumed = enroll(cli, broker, "--poll-interval", "0.1")

    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.startswith("keybroker: already enrolled as bob (id 1); waiting")
    assert resumed.stdout == "bob is approved for: anthropic\n"
    assert len(broker.calls("POST", "/v1/enroll")) == 1


def test_resuming_with_timeout_zero_checks_once(broker: FakeBroker, cli: Cli, bob: Agent) -> None:
    approved = enroll(cli, broker, "--timeout", "0")
    cli.write_config(broker.url, broker.add_agent("dave", status="pending", scopes=("anthropic",)))
    broker.polls_before_verdict = None
    pending = cli("enroll", broker.url, "--name", "dave", "--can", "anthropic", "--timeout", "0")

    assert (approved.returncode, approved.stdout) == (0, "bob is approved for: anthropic\n")
    assert (pending.returncode, pending.stdout) == (0, "")
    assert pending.stderr.splitlines() == [
        "keybroker: already enrolled as dave (id 2); checking for an admin to approve it at "
        f"{broker.url}/admin/",
        f"keybroker: dave is still pending; an admin must approve it at {broker.url}/admin/",
    ]
    assert len(broker.calls("GET", "/v1/enroll/status")) == 2
    assert broker.calls("POST", "/v1/enroll") == []


def test_enrolling_a_second_agent_into_the_same_config_is_refused(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    result = cli("enroll", broker.url, "--name", "alice", "--can", "anthropic")

    assert result.returncode == 1
    assert only_line(result.stderr) == (
        f"keybroker: {cli.config} already holds bob at {broker.url}; run keybroker unenroll "
        "first, or pass --config PATH for another agent\n"
    )
    assert broker.calls("POST", "/v1/enroll") == []


def test_timeout_zero_enrolls_without_waiting(broker: FakeBroker, cli: Cli) -> None:
    result = enroll(cli, broker, "--timeout", "0")

    assert result.returncode == 0
    assert result.stderr == (
        f"keybroker: enrolled as bob (id 1); an admin must approve it at {broker.url}/admin/; "
        "see keybroker status\n"
    )
    assert broker.calls("GET", "/v1/enroll/status") == []
    assert cli.config.exists()


def test_polling_honours_retry_after_and_rides_out_server_errors(
    broker: FakeBroker, cli: Cli
) -> None:
    broker.failing_polls = [503, 429]
    result = enroll(cli, broker, "--poll-interval", "0.05")

    assert result.returncode == 0, result.stderr
    first, throttled, answered = broker.calls("GET", "/v1/enroll/status")
    assert throttled.at - first.at < 0.9
    assert answered.at - throttled.at >= 1.0  # Retry-After: 1, not the 0.05 s interval


def test_server_refusals_surface_as_one_line_with_exit_1(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    cli.config.unlink()
    taken = enroll(cli, broker)
    unknown = cli("enroll", broker.url, "--name", "carol", "--can", "openai")

    assert taken.returncode == unknown.returncode == 1
    assert only_line(taken.stderr) == "keybroker: an agent named bob already exists\n"
    assert only_line(unknown.stderr) == "keybroker: unknown backend: openai\n"
    assert not cli.config.exists()


# --- tokens ----------------------------------------------------------------------------------


def test_get_prints_only_the_token(broker: FakeBroker, cli: Cli, bob: Agent) -> None:
    with_ttl = cli("get", "anthropic", "--ttl", "30m")
    default = cli("get", "anthropic")
    whole = cli("get", "anthropic", "--json")

    assert with_ttl.returncode == default.returncode == whole.returncode == 0
    tokens = [t["token"] for t in broker.tokens.values()]
    assert with_ttl.stdout == f"{tokens[0]}\n"
    assert default.stdout == f"{tokens[1]}\n"
    assert with_ttl.stderr == default.stderr == ""
    assert [c.body for c in broker.calls("POST", "/v1/credentials/anthropic")] == [
        {"ttl": "30m"},
        {},
        {},
    ]
    assert json.loads(whole.stdout) == {
        "id": "tok3",
        "token": tokens[2],
        "backend": "anthropic",
        "expires_at": "2030-01-01T00:30:00Z",
        "ttl": TTL_DEFAULT,
        "base_url": f"{broker.url}/v1/proxy/anthropic",
    }


def test_a_ttl_out_of_bounds_names_the_bounds(broker: FakeBroker, cli: Cli, bob: Agent) -> None:
    result = cli("get", "anthropic", "--ttl", "2h")

    assert result.returncode == 1
    assert result.stdout == ""
    assert only_line(result.stderr) == "keybroker: ttl must be between 1m and 1h for anthropic\n"


def test_a_pending_agent_or_a_missing_grant_exits_3(broker: FakeBroker, cli: Cli) -> None:
    cli.write_config(broker.url, broker.add_agent("dave", status="pending", scopes=("anthropic",)))
    pending = cli("get", "anthropic")
    cli.write_config(broker.url, broker.add_agent("erin", scopes=("anthropic",)))
    ungranted = cli("get", "anthropic-staging")

    assert pending.returncode == ungranted.returncode == 3
    assert only_line(pending.stderr) == "keybroker: agent dave is pending\n"
    assert only_line(ungranted.stderr) == "keybroker: erin has no grant for anthropic-staging\n"
    assert pending.stdout == ungranted.stdout == ""


def test_env_output_is_evaluated_by_bash_and_read_by_the_sdk(
    broker: FakeBroker, cli: Cli, bob: Agent, tmp_path: Path
) -> None:
    # A hostile base_url proves the values are quoted, not just usually harmless.
    broker.base_url = f"{broker.url}/v1/proxy/anthropic?a='$(touch pwned)'&b=`touch pwned`"
    script = (
        f'eval "$({sys.executable} -m keybroker.cli env anthropic --ttl 5m)" || exit 9\n'
        'printf "%s\\n" "$ANTHROPIC_BASE_URL" "$ANTHROPIC_AUTH_TOKEN"\n'
        'echo "${ANTHROPIC_API_KEY-unset}"\n'
        f"{sys.executable} -c 'import anthropic; c = anthropic.Anthropic(); "
        'print(c.auth_token == __import__("os").environ["ANTHROPIC_AUTH_TOKEN"], c.api_key)\'\n'
    )
    result = subprocess.run(
        ["bash", "-c", script],
        env={**cli.env, "ANTHROPIC_API_KEY": "sk-ant-api03-real-key-that-must-not-travel"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    [token] = broker.tokens.values()
    assert result.stdout.splitlines() == [broker.base_url, token["token"], "unset", "True None"]
    assert not (tmp_path / "pwned").exists()
    assert [c.body for c in broker.calls("POST", "/v1/credentials/anthropic")] == [{"ttl": "5m"}]


def test_ls_and_revoke(broker: FakeBroker, cli: Cli, bob: Agent) -> None:
    empty = cli("ls")
    cli("get", "anthropic")
    cli("get", "anthropic")
    listed = cli("ls")
    prefixes = [t["prefix"] for t in broker.tokens.values()]
    revoked = cli("revoke", "tok1")
    after = cli("ls", "--json")
    unknown = cli("revoke", "tok1")

    assert (empty.returncode, empty.stdout, empty.stderr) == (0, "", "keybroker: no live tokens\n")
    pad = " " * (len(prefixes[0]) - len("PREFIX"))
    assert listed.stdout.splitlines() == [
        f"ID    BACKEND    PREFIX{pad}  EXPIRES_AT",
        f"tok1  anthropic  {prefixes[0]}  2030-01-01T00:30:00Z",
        f"tok2  anthropic  {prefixes[1]}  2030-01-01T00:30:00Z",
    ]
    assert revoked.stdout == "revoked tok1\n"
    assert [t["id"] for t in json.loads(after.stdout)] == ["tok2"]
    assert unknown.returncode == 1
    assert only_line(unknown.stderr) == (
        "keybroker: no live token matches tok1 (keybroker ls lists them)\n"
    )


def test_revoke_takes_the_tokens_prefix_and_refuses_an_ambiguous_one(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    for _ in range(3):
        cli("get", "anthropic")
    first, _, _ = broker.tokens.values()
    ambiguous = cli("revoke", "tok")
    by_prefix = cli("revoke", first["prefix"])

    assert ambiguous.returncode == 1
    assert only_line(ambiguous.stderr) == (
        "keybroker: tok matches 3 live tokens (tok1, tok2, tok3); give more of the id\n"
    )
    assert by_prefix.stdout == "revoked tok1\n"
    assert [s.path for s in broker.seen if s.method == "DELETE"] == ["/v1/active/tok1"]
    assert [t["id"] for t in json.loads(cli("ls", "--json").stdout)] == ["tok2", "tok3"]


# --- status, request, unenroll ---------------------------------------------------------------


def test_status_shows_grants_once_approved(broker: FakeBroker, cli: Cli, bob: Agent) -> None:
    result = cli("status")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "name:       bob",
        "id:         1",
        f"server:     {broker.url}",
        "status:     approved",
        "scopes:     anthropic",
        "requested:  anthropic",
        "grants:",
        f"  anthropic  {broker.url}/v1/proxy/anthropic  ttl min/default/max 1m/10m/1h",
    ]


def test_status_of_a_pending_agent_falls_back_to_the_enrollment(
    broker: FakeBroker, cli: Cli
) -> None:
    broker.polls_before_verdict = None
    cli.write_config(broker.url, broker.add_agent("dave", status="pending", scopes=("anthropic",)))
    result = cli("status", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "id": 1,
        "name": "dave",
        "status": "pending",
        "scopes": [],
        "requested_scopes": ["anthropic"],
    }
    assert [s.path for s in broker.seen] == ["/v1/status", "/v1/enroll/status"]


def test_request_asks_for_more_scopes(broker: FakeBroker, cli: Cli, bob: Agent) -> None:
    result = cli("request", "--can", "anthropic-staging")

    assert result.returncode == 0, result.stderr
    [call] = broker.calls("POST", "/v1/request")
    assert call.body == {"scopes": ["anthropic-staging"]}
    assert result.stdout == (
        f"requested anthropic-staging; an admin must approve it at {broker.url}/admin/ "
        "(granted now: anthropic)\n"
    )


def test_unenroll_deletes_the_agent_and_then_the_config(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    result = cli("unenroll")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"unenrolled bob; its tokens are revoked and {cli.config} is deleted\n"
    assert len(broker.calls("DELETE", "/v1/self")) == 1
    assert broker.agents == {}
    assert not cli.config.exists()
    assert cli("status").stderr == ENROLL_HINT


def test_an_agent_the_server_forgot_is_told_to_enroll_again(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    del broker.agents[bob.vend_token]
    status = cli("status")
    unenroll = cli("unenroll")

    assert status.returncode == 6
    assert only_line(status.stderr) == (
        "keybroker: invalid vend token; the server does not know this agent (unenrolled?); "
        "run keybroker enroll URL --name N --can BACKEND\n"
    )
    assert unenroll.returncode == 0
    assert not cli.config.exists()


# --- failures and secrets --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["get", "anthropic"],
        ["env", "anthropic"],
        ["ls"],
        ["revoke", "tok1"],
        ["request", "--can", "anthropic"],
        ["unenroll"],
    ],
)
def test_every_command_without_a_config_says_how_to_enroll(cli: Cli, args: list[str]) -> None:
    result = cli(*args)

    assert (result.returncode, result.stdout, result.stderr) == (6, "", ENROLL_HINT)


def test_an_unreachable_server_is_one_line_with_exit_5(cli: Cli, bob: Agent) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    other = str(cli.config.with_name("other.json"))
    enrolling = cli("enroll", dead, "--name", "zed", "--can", "anthropic", "--config", other)
    cli.write_config(dead, bob)
    getting = cli("get", "anthropic")

    for result in (enrolling, getting):
        assert result.returncode == 5
        assert result.stdout == ""
        assert only_line(result.stderr).startswith(f"keybroker: cannot reach {dead} (")


def test_usage_errors_are_one_line_with_exit_2(cli: Cli) -> None:
    for args in (
        ["get"],
        ["enroll", "http://127.0.0.1:1", "--name", "bob"],
        ["enroll", "http://127.0.0.1:1", "--name", "bob", "--can", "x", "--timeout", "soon"],
        ["enroll", "ftp://example.com", "--name", "bob", "--can", "x"],
    ):
        result = cli(*args)
        assert result.returncode == 2, args
        assert only_line(result.stderr).startswith("keybroker: ")


def test_the_config_path_comes_from_flag_then_env_then_xdg(
    broker: FakeBroker, cli: Cli, tmp_path: Path
) -> None:
    flag, env = tmp_path / "flag" / "kb.json", tmp_path / "env.json"
    by_flag = cli(
        "enroll",
        broker.url,
        "--name",
        "a1",
        "--can",
        "anthropic",
        "--timeout",
        "0",
        "--config",
        str(flag),
        env={"KEYBROKER_CONFIG": str(env)},
    )
    by_env = cli(
        "enroll",
        broker.url,
        "--name",
        "a2",
        "--can",
        "anthropic",
        "--timeout",
        "0",
        env={"KEYBROKER_CONFIG": str(env)},
    )
    by_xdg = cli("enroll", broker.url, "--name", "a3", "--can", "anthropic", "--timeout", "0")

    assert by_flag.returncode == by_env.returncode == by_xdg.returncode == 0
    assert [json.loads(p.read_text())["name"] for p in (flag, env, cli.config)] == [
        "a1",
        "a2",
        "a3",
    ]
    assert stat.S_IMODE(flag.parent.stat().st_mode) == 0o700
    assert cli("status", "--config", str(flag)).stdout.startswith("name:       a1\n")


def test_a_config_readable_by_others_is_warned_about(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    cli.config.chmod(0o644)
    result = cli("status")

    assert result.returncode == 0
    assert result.stderr == (
        f"keybroker: warning: {cli.config} is readable by other users; run chmod 600 {cli.config}\n"
    )


def test_the_vend_token_never_reaches_the_terminal(broker: FakeBroker, cli: Cli) -> None:
    broker.polls_before_verdict = 1
    enroll(cli, broker, "--poll-interval", "0.1")
    [agent] = broker.agents.values()
    for args in (
        ["status"],
        ["get", "anthropic"],
        ["env", "anthropic"],
        ["ls"],
        ["revoke", "tok1"],
        ["revoke", "nope"],
        ["request", "--can", "anthropic-staging"],
        ["get", "anthropic", "--ttl", "9h"],
        ["unenroll"],
    ):
        cli(*args)
    # A server bug that echoes the credential in an error must not leak it either.
    broker.leaky_errors = True
    cli.write_config(broker.url, agent)
    leaked = cli("status")

    assert leaked.returncode == 6
    assert "invalid vend token Bearer ckr_…;" in leaked.stderr
    assert len(cli.outputs) == 22
    for output in cli.outputs:
        assert agent.vend_token not in output
        assert agent.vend_token[4:20] not in output


def test_it_imports_nothing_from_django_or_the_server(cli: Cli) -> None:
    probe = (
        "import sys, keybroker.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'django', 'rest_framework', 'channels', 'celery', 'proxy', 'audit'} "
        "or (m.startswith('broker.') and m != 'keybroker.cli')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=cli.env, cwd=REPO, capture_output=True, text=True
    )

    assert result.stdout == "[]\n", result.stderr
    assert cli("--version").stdout == "keybroker 0.1.0\n"


def test_the_console_script_is_installed(cli: Cli) -> None:
    script = Path(sys.executable).parent / "keybroker"
    result = subprocess.run(
        [str(script), "status"], env=cli.env, capture_output=True, text=True, check=False
    )

    assert os.access(script, os.X_OK)
    assert (result.returncode, result.stderr) == (6, ENROLL_HINT)


# --- identity-token --------------------------------------------------------------------------

ANTHROPIC = "https://api.anthropic.com"


def test_identity_token_creates_client_credentials_once_and_prints_only_the_jwt(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    broker.identity_audiences.add(ANTHROPIC)
    first = cli("identity-token", "--audience", ANTHROPIC)
    second = cli("identity-token", "--audience", ANTHROPIC)

    assert (first.returncode, second.returncode) == (0, 0), first.stderr
    assert [first.stdout, second.stdout] == [f"{t}\n" for t in broker.identity_tokens]
    assert len(broker.calls("POST", "/v1/clients")) == 1  # kept in the config, reused
    config = json.loads(cli.config.read_text())
    assert config["client_id"] == "kbc_1"
    assert config["client_secret"] == broker.clients["kbc_1"]
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    assert first.stderr == (
        f"keybroker: created OAuth client kbc_1 for bob; its secret is kept in {cli.config}\n"
    )
    [posted, _] = broker.calls("POST", "/oauth/token")
    assert posted.body == {
        "grant_type": "client_credentials",
        "client_id": "kbc_1",
        "client_secret": broker.clients["kbc_1"],
        "audience": ANTHROPIC,
    }
    assert posted.authorization == ""  # the vend token goes nowhere near /oauth/token
    assert broker.clients["kbc_1"] not in first.stderr + second.stderr


def test_identity_token_writes_the_file_private_and_atomically(
    broker: FakeBroker, cli: Cli, bob: Agent, tmp_path: Path
) -> None:
    broker.identity_audiences.add(ANTHROPIC)
    out = tmp_path / "run" / "identity.jwt"
    out.parent.mkdir()
    out.write_text("stale\n")
    out.chmod(0o644)
    result = cli("identity-token", "--audience", ANTHROPIC, "--out", str(out), umask=0)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    [token] = broker.identity_tokens
    assert out.read_text() == token + "\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == ["identity.jwt"]  # no temp file left
    assert result.stderr.splitlines()[-1] == (
        f"keybroker: wrote an identity token for {ANTHROPIC} to {out}; it expires in 10m"
    )
    assert token not in result.stderr


def test_identity_token_for_an_audience_not_granted_exits_3_naming_the_fix(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    result = cli("identity-token", "--audience", "https://other.example")

    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "keybroker: agent bob may not get tokens for audience https://other.example; an admin "
        "must allow it: manage.py agent grant-identity bob --audience https://other.example"
    )


def test_identity_token_replaces_client_credentials_the_server_forgot(
    broker: FakeBroker, cli: Cli, bob: Agent
) -> None:
    broker.identity_audiences.add(ANTHROPIC)
    assert cli("identity-token", "--audience", ANTHROPIC).returncode == 0
    broker.clients.clear()  # revoked on the server

    result = cli("identity-token", "--audience", ANTHROPIC)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{broker.identity_tokens[-1]}\n"
    assert json.loads(cli.config.read_text())["client_id"] == "kbc_2"
    assert len(broker.calls("POST", "/oauth/token")) == 3


def test_identity_token_refresh_keeps_the_file_fresh(
    broker: FakeBroker, cli: Cli, bob: Agent, tmp_path: Path
) -> None:
    assert cli("identity-token", "--audience", ANTHROPIC, "--refresh").returncode == 2
    broker.identity_audiences.add(ANTHROPIC)
    broker.identity_lifetime = 2  # rewritten every second
    out = tmp_path / "identity.jwt"
    running = subprocess.Popen(
        [sys.executable, "-m", "keybroker.cli", "identity-token", "--audience", ANTHROPIC,
         "--out", str(out), "--refresh"],
        env=cli.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def renewed_twice() -> bool:
            assert running.poll() is None, running.communicate()
            return len(broker.identity_tokens) >= 3

        wait_until(renewed_twice, timeout=30, what="the token to be renewed", interval=0.05)
        written = set()

        def rewritten() -> bool:
            written.add(out.read_text())  # never a partial file: always one whole token
            return len(written) >= 2

        wait_until(rewritten, timeout=30, what="the file to be rewritten", interval=0.01)
    finally:
        running.terminate()
        _, stderr = running.communicate(timeout=10)
    assert written <= {f"{t}\n" for t in broker.identity_tokens}
    assert len(written) == 2
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    for token in broker.identity_tokens:
        assert token not in stderr
