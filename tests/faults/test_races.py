"""Races through the REST API of two live web processes on one database: requests released
together by a barrier, half to each process, so they meet in the database as requests of
different machines do. One decision on a pending agent wins and is audited once; a token
revoked many times at once is revoked and audited once; mints racing an unenrollment leave
no live token behind; mints racing each other each get their own token.

PostgreSQL is where this matters (SQLite runs one write transaction at a time); CI runs it
there."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.contrib.auth.models import AbstractBaseUser

from audit.models import AuditEvent
from broker.infra.errors import ServiceError
from broker.models import Agent, AgentStatus, Backend, Token
from broker.services.admin_tokens import admintoken_create
from broker.services.agents import agent_enroll, agent_unenroll, agent_ungrant
from broker.services.backends import backend_add
from broker.services.tokens import token_issue
from tests.fake_anthropic import FakeAnthropic
from tests.faults.figures import Figure, Figures
from tests.keys import api_key
from tests.proxy_cast import audit_drained

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

RACERS = 12
ROUNDS = 3


@pytest.fixture
def servers(live_url: str, second_process: str) -> list[str]:
    return [live_url, second_process]


@pytest.fixture
def backend(fake_anthropic: FakeAnthropic, settings: object) -> Backend:
    # The racers come from one address; the enrollment throttle is not what is raced here.
    settings.ENROLL_RATE = "100000/5m"  # type: ignore[attr-defined]
    return backend_add(name="anthropic", secret=api_key(tail="R4ce"), base_url=fake_anthropic.url)


@pytest.fixture
def admin(alice: AbstractBaseUser) -> str:
    return admintoken_create(name="races", username="alice").plaintext


def together(*calls: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """Run the calls in threads released at once; their answers in the same order."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], httpx.Response]) -> httpx.Response:
        start.wait(timeout=10)
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def call(
    method: str, url: str, credential: str, body: object = None
) -> Callable[[], httpx.Response]:
    headers = {"Authorization": f"Bearer {credential}"}
    return lambda: httpx.request(method, url, headers=headers, json=body, timeout=30)


def events(action: str, agent: Agent | None = None, **detail: str) -> int:
    found = AuditEvent.objects.filter(action=action, **detail)
    return found.filter(agent=agent.name).count() if agent is not None else found.count()


def test_one_decision_on_a_pending_agent_wins_and_is_audited_once(
    servers: list[str], backend: Backend, admin: str, figures: Figures
) -> None:
    outcomes: Counter[str] = Counter()
    for round_ in range(ROUNDS):
        agent = agent_enroll(name=f"carol-{round_}", scopes=["anthropic"]).agent
        decisions = [
            call("POST", f"{servers[n % 2]}/v1/admin/pending/{agent.pk}/{verb}", admin, {})
            for n, verb in enumerate(["approve", "reject"] * (RACERS // 2))
        ]
        answers = together(*decisions)
        codes = Counter(answer.status_code for answer in answers)
        assert codes == {200: 1, 409: RACERS - 1}, codes
        agent.refresh_from_db()
        won = "approved" if agent.status == AgentStatus.APPROVED else "rejected"
        outcomes[won] += 1
        audit_drained()
        assert events("agent.approved", agent) + events("agent.rejected", agent) == 1
        assert events(f"agent.{won}", agent) == 1
        assert agent.grants.exists() is (won == "approved")
    won_by = ", ".join(f"{count} {how}" for how, count in sorted(outcomes.items()))
    figures.add(
        Figure(
            case="Races: approve and reject of one pending agent at once",
            load=f"{ROUNDS} agents x {RACERS} decisions at once, over 2 web processes",
            faults="-",
            refused=f"{ROUNDS * (RACERS - 1)} (409: already decided)",
            lost=0,
            holds=f"one decision each ({won_by}); audited once; grants only if approved",
        )
    )


def test_a_token_revoked_many_times_at_once_is_revoked_and_audited_once(
    servers: list[str], backend: Backend, admin: str, alice: AbstractBaseUser, figures: Figures
) -> None:
    enrolled = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice)
    for _ in range(ROUNDS):
        token = token_issue(agent=enrolled.agent, backend_name="anthropic").token
        revokes = [
            call("DELETE", f"{servers[n % 2]}/v1/admin/tokens/{token.pk}", admin)
            if n % 3
            else call("DELETE", f"{servers[n % 2]}/v1/active/{token.pk}", enrolled.vend_token)
            for n in range(RACERS)
        ]
        assert {answer.status_code for answer in together(*revokes)} == {204}
        token.refresh_from_db()
        assert token.revoked_at is not None
        assert events("token.revoked", token_id=str(token.pk)) == 1
    figures.add(
        Figure(
            case="Races: one token revoked by admin and agent at once",
            load=f"{ROUNDS} tokens x {RACERS} revocations at once, over 2 web processes",
            faults="-",
            refused="- (every revocation answers 204: it is idempotent)",
            lost=0,
            holds="revoked once, one token.revoked event each",
        )
    )


def test_mints_racing_an_unenrollment_leave_no_live_token(
    servers: list[str], backend: Backend, alice: AbstractBaseUser, figures: Figures
) -> None:
    minted = refused = 0
    for round_ in range(ROUNDS):
        enrolled = agent_enroll(name=f"dave-{round_}", scopes=["anthropic"], approved_by=alice)
        vend = enrolled.vend_token
        mints = [
            call("POST", f"{servers[n % 2]}/v1/credentials/anthropic", vend, {"ttl": "5m"})
            for n in range(RACERS)
        ]
        answers = together(*mints[: RACERS // 2], call("DELETE", f"{servers[0]}/v1/self", vend),
                           *mints[RACERS // 2 :])  # fmt: skip
        codes = Counter(answer.status_code for answer in answers)
        assert set(codes) <= {201, 204, 401}, codes
        minted += codes[201]
        refused += codes[401]
        agent = Agent.objects.get(pk=enrolled.agent.pk)
        assert agent.status == AgentStatus.UNENROLLED
        live = Token.objects.live().filter(agent=agent)
        assert list(live.values_list("display_prefix", flat=True)) == []
        audit_drained()
        issued = events("token.issued", agent)
        assert issued == codes[201]
        assert events("token.revoked", agent) == issued
    figures.add(
        Figure(
            case="Races: token mints racing the agent's unenrollment",
            load=f"{ROUNDS} agents x {RACERS} mints and 1 unenroll at once, over 2 web processes",
            faults="-",
            refused=f"{refused} mints after the unenrollment (401)",
            lost=0,
            holds=f"no live token left of {minted} minted; each minted one revoked and audited",
        )
    )


def test_mints_racing_each_other_each_get_their_own_token(
    servers: list[str], backend: Backend, alice: AbstractBaseUser
) -> None:
    enrolled = agent_enroll(name="erin", scopes=["anthropic"], approved_by=alice)
    mints = [
        call("POST", f"{servers[n % 2]}/v1/credentials/anthropic", enrolled.vend_token, {})
        for n in range(RACERS)
    ]
    answers = together(*mints)
    assert [answer.status_code for answer in answers] == [201] * RACERS
    ids = {answer.json()["id"] for answer in answers}
    assert len(ids) == len({answer.json()["token"] for answer in answers}) == RACERS
    assert Token.objects.live().filter(agent=enrolled.agent).count() == RACERS
    audit_drained()
    assert events("token.issued", enrolled.agent) == RACERS


def test_a_stale_agent_cannot_mint_after_it_was_unenrolled_or_ungranted(
    backend: Backend, alice: AbstractBaseUser
) -> None:
    """The race's window, held open: the agent as its request read it before the
    unenrollment (or the grant's removal) committed."""
    gone = agent_enroll(name="frank", scopes=["anthropic"], approved_by=alice).agent
    as_authenticated = Agent.objects.get(pk=gone.pk)
    agent_unenroll(agent=gone)
    with pytest.raises(ServiceError, match="unenrolled"):
        token_issue(agent=as_authenticated, backend_name="anthropic")
    ungranted = agent_enroll(name="grace", scopes=["anthropic"], approved_by=alice).agent
    as_authenticated = Agent.objects.get(pk=ungranted.pk)
    agent_ungrant(agent=ungranted, backend=backend)
    with pytest.raises(ServiceError, match="no grant"):
        token_issue(agent=as_authenticated, backend_name="anthropic")
    assert not Token.objects.filter(agent__name__in=["frank", "grace"]).exists()
