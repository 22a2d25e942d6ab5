"""Each state rule is written once (issue 12): a token's liveness, an agent waiting for a
decision, why a caller is refused, and how often "last used" is written. Every surface
that applies a rule must agree with the one definition, and with docs/errors.md."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client
from django.utils import timezone

from broker.models import (
    LAST_USED_RESOLUTION,
    AdminToken,
    Agent,
    AgentStatus,
    Backend,
    OidcClient,
    Token,
    TokenState,
    touch_last_used,
)
from broker.services.access import access_changed
from broker.services.admin_tokens import admintoken_create
from broker.services.agents import agent_enroll
from broker.services.tokens import token_issue
from tests.agents import as_agent, send
from tests.proxy_cast import Proxied

MESSAGE = {
    "model": "claude-haiku-4-5",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "Hi"}],
}


def _token(agent: Agent, backend: Backend, *, expires_in: timedelta, revoked: bool) -> Token:
    now = timezone.now()
    return Token.objects.create(
        agent=agent,
        backend=backend,
        digest=f"{agent.name}-{expires_in}-{revoked}",
        display_prefix="crd_test",
        ttl_seconds=600,
        expires_at=now + expires_in,
        revoked_at=now if revoked else None,
    )


@pytest.mark.django_db
def test_a_tokens_state_is_the_same_in_python_and_in_sql(
    anthropic: Backend, alice: AbstractBaseUser
) -> None:
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    expected = {
        _token(bob, anthropic, expires_in=timedelta(minutes=5), revoked=False): "live",
        _token(bob, anthropic, expires_in=timedelta(minutes=-5), revoked=False): "expired",
        _token(bob, anthropic, expires_in=timedelta(minutes=5), revoked=True): "revoked",
        # Revoked wins over expired, so a token revoked before it expired stays "revoked".
        _token(bob, anthropic, expires_in=timedelta(minutes=-5), revoked=True): "revoked",
    }
    now = timezone.now()
    assert {token: token.state(now) for token in expected} == expected
    for state in TokenState:
        in_sql = set(Token.objects.in_state(state, now))
        assert in_sql == {token for token, said in expected.items() if said == state}, state
    assert [token.is_live(now) for token in expected] == [True, False, False, False]


@pytest.mark.django_db
def test_a_token_dies_at_the_instant_it_expires(
    anthropic: Backend, alice: AbstractBaseUser
) -> None:
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    token = _token(bob, anthropic, expires_in=timedelta(minutes=5), revoked=False)
    at_expiry = token.expires_at
    assert token.state(at_expiry) == TokenState.EXPIRED
    assert token.state(at_expiry - timedelta(microseconds=1)) == TokenState.LIVE
    assert list(Token.objects.live(at_expiry)) == []
    assert list(Token.objects.expired(at_expiry)) == [token]


@pytest.mark.django_db
def test_who_waits_for_a_decision_is_the_same_in_python_and_in_sql(
    anthropic: Backend, alice: AbstractBaseUser
) -> None:
    agent_enroll(name="new", scopes=["anthropic"])
    agent_enroll(name="settled", scopes=["anthropic"], approved_by=alice)
    asking = agent_enroll(name="asking", scopes=["anthropic"], approved_by=alice).agent
    Agent.objects.filter(pk=asking.pk).update(requested_scopes=["anthropic-staging"])
    refused = agent_enroll(name="refused", scopes=["anthropic"]).agent
    Agent.objects.filter(pk=refused.pk).update(status=AgentStatus.REJECTED)
    gone = agent_enroll(name="gone", scopes=["anthropic"]).agent
    Agent.objects.filter(pk=gone.pk).update(status=AgentStatus.UNENROLLED)

    agents = list(Agent.objects.all())
    assert {a.name for a in agents if a.is_waiting} == {"new", "asking"}
    assert {a.name for a in Agent.objects.waiting()} == {"new", "asking"}
    ranks = {a.name: a.decision_rank for a in Agent.objects.with_decision_rank()}
    assert ranks == {"new": 0, "asking": 1, "settled": 2, "refused": 2, "gone": 2}


# docs/errors.md, row by row: what an agent in each status hears from the agent API.
API_REFUSALS = {
    AgentStatus.PENDING: (403, "permission_denied", "agent carol is pending approval by an admin"),
    AgentStatus.REJECTED: (403, "permission_denied", "agent carol was rejected by an admin"),
    AgentStatus.UNENROLLED: (
        401,
        "authentication_error",
        "agent carol was unenrolled; enroll again",
    ),
}
# ... and from the proxy, in Anthropic's shape, for a token that is itself fine.
PROXY_REFUSALS = {
    AgentStatus.PENDING: (403, "permission_error", "agent carol is pending approval by an admin"),
    AgentStatus.REJECTED: (403, "permission_error", "agent carol was rejected by an admin"),
    AgentStatus.UNENROLLED: (
        401,
        "authentication_error",
        "agent carol was unenrolled; enroll again",
    ),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("status", list(API_REFUSALS))
def test_an_unapproved_agent_hears_the_same_status_and_words_from_the_api_and_the_proxy(
    proxied: Proxied, alice: AbstractBaseUser, status: AgentStatus
) -> None:
    enrolled = agent_enroll(name="carol", scopes=["anthropic"], approved_by=alice)
    token = token_issue(agent=enrolled.agent, backend_name="anthropic", ttl="10m").plaintext
    proxy_url = f"{proxied.base_url}/v1/messages"
    assert httpx.post(proxy_url, json=MESSAGE, headers={"x-api-key": token}).status_code == 200

    # Not a path the services take (unenrolling revokes every token first): this is the
    # proxy's own check on the agent, behind the token's, and it must say what the API says.
    Agent.objects.filter(pk=enrolled.agent.pk).update(status=status)
    access_changed()

    via_proxy = httpx.post(proxy_url, json=MESSAGE, headers={"x-api-key": token})
    error = via_proxy.json()["error"]
    assert (via_proxy.status_code, error["type"], error["message"]) == PROXY_REFUSALS[status]
    via_api = send(as_agent(enrolled.vend_token), "post", "/v1/credentials/anthropic", {})
    error = via_api.json()["error"]
    assert (via_api.status_code, error["type"], error["message"]) == API_REFUSALS[status]


@pytest.mark.django_db(transaction=True)
def test_a_revoked_and_expired_token_is_reported_revoked_by_the_proxy(proxied: Proxied) -> None:
    Token.objects.update(
        expires_at=timezone.now() - timedelta(minutes=1), revoked_at=timezone.now()
    )
    access_changed()
    refused = httpx.post(
        f"{proxied.base_url}/v1/messages", json=MESSAGE, headers={"x-api-key": proxied.token}
    )
    assert (refused.status_code, refused.json()["error"]) == (
        401,
        {"type": "authentication_error", "message": "token revoked"},
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("model", "field"),
    [(Token, "last_used_at"), (AdminToken, "last_used_at"), (OidcClient, "last_used_at"),
     (Agent, "last_seen_at")],
)  # fmt: skip
def test_last_used_is_written_at_most_once_a_minute_for_every_credential(
    client_credentials: dict[str, Any], alice: AbstractBaseUser, model: Any, field: str
) -> None:
    agent = Agent.objects.get(pk=client_credentials["agent_id"])
    rows = {
        Token: lambda: token_issue(agent=agent, backend_name="anthropic").token,
        AdminToken: lambda: AdminToken.objects.get(),
        OidcClient: lambda: OidcClient.objects.get(),
        Agent: lambda: agent,
    }
    row = rows[model]()
    model.objects.filter(pk=row.pk).update(**{field: None})
    start = timezone.now()

    assert touch_last_used(model, row.pk, now=start, field=field) == start
    within = start + LAST_USED_RESOLUTION - timedelta(seconds=1)
    assert touch_last_used(model, row.pk, now=within, field=field) is None
    later = start + LAST_USED_RESOLUTION
    assert touch_last_used(model, row.pk, now=later, field=field) == later
    assert getattr(model.objects.get(pk=row.pk), field) == later


def _oauth_token(credentials: dict[str, Any]) -> Any:
    form = {
        "grant_type": "client_credentials",
        "client_id": credentials["client_id"],
        "client_secret": credentials["client_secret"],
    }
    return send(Client(), "post", "/oauth/token", form)


@pytest.mark.django_db
def test_an_oidc_clients_last_use_is_written_and_throttled(
    client_credentials: dict[str, Any],
) -> None:
    client = OidcClient.objects.get(client_id=client_credentials["client_id"])
    assert client.last_used_at is None

    assert _oauth_token(client_credentials).status_code == 200
    first = OidcClient.objects.get(pk=client.pk).last_used_at
    assert first is not None
    assert _oauth_token(client_credentials).status_code == 200
    assert OidcClient.objects.get(pk=client.pk).last_used_at == first

    a_while_ago = first - LAST_USED_RESOLUTION
    OidcClient.objects.filter(pk=client.pk).update(last_used_at=a_while_ago)
    assert _oauth_token(client_credentials).status_code == 200
    assert OidcClient.objects.get(pk=client.pk).last_used_at > first


@pytest.mark.django_db
def test_an_admin_tokens_last_use_is_throttled(alice: AbstractBaseUser) -> None:
    plaintext = admintoken_create(name="ci", username="alice").plaintext
    admin_api = Client(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert admin_api.get("/v1/admin/agents/").status_code == 200
    first = AdminToken.objects.get().last_used_at
    assert first is not None
    assert admin_api.get("/v1/admin/agents/").status_code == 200
    assert AdminToken.objects.get().last_used_at == first


@pytest.mark.django_db
def test_the_admin_lists_tokens_by_the_same_states(
    anthropic: Backend, alice: AbstractBaseUser, admin_client: Client
) -> None:
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice).agent
    tokens = {
        "live": _token(bob, anthropic, expires_in=timedelta(minutes=5), revoked=False),
        "expired": _token(bob, anthropic, expires_in=timedelta(minutes=-5), revoked=False),
        "revoked": _token(bob, anthropic, expires_in=timedelta(minutes=-5), revoked=True),
    }
    for state, token in tokens.items():
        page = admin_client.get(f"/admin/broker/token/?state={state}")
        shown = {t.pk for t in page.context["cl"].result_list}
        assert shown == {token.pk}, state
