"""Approving agents in the admin: alice decides, bob and carol wait, charlie stays out."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from audit.models import AuditEvent
from broker.infra.errors import NotPermitted
from broker.models import Agent, AgentStatus, Backend, Token
from broker.services.agents import (
    EnrolledAgent,
    agent_enroll,
    agent_request_scopes,
    agent_scopes,
)
from broker.services.tokens import token_issue

pytestmark = pytest.mark.django_db

AGENTS = "/admin/broker/agent/"


@pytest.fixture
def admin_client(alice: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def both(anthropic: Backend, staging: Backend) -> list[str]:
    return [anthropic.name, staging.name]


def enroll(name: str, scopes: list[str], *, by: AbstractBaseUser | None = None) -> EnrolledAgent:
    return agent_enroll(name=name, scopes=scopes, approved_by=by)


def approve_url(agent: Agent) -> str:
    return f"{AGENTS}{agent.pk}/approve/"


def reject_url(agent: Agent) -> str:
    return f"{AGENTS}{agent.pk}/reject/"


def html(response: object) -> str:
    return response.content.decode()  # type: ignore[attr-defined, no-any-return]


def test_the_list_shows_who_waits_first(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    enroll("aaron", ["anthropic"], by=alice)  # approved, asks for nothing: last
    wants_more = enroll("abby", ["anthropic"], by=alice).agent
    agent_request_scopes(agent=wants_more, scopes=["anthropic-staging"])
    enroll("zed", ["anthropic"])  # pending: first, whatever its name
    page = html(admin_client.get(AGENTS))
    assert page.index("zed") < page.index("abby") < page.index("aaron")
    assert 'class="kb-agent-status kb-agent-status-pending"' in page
    assert 'class="kb-agent-status kb-agent-status-approved"' in page
    # Only the two that wait get the row buttons.
    assert page.count('class="button kb-approve"') == 2


def test_the_index_counts_agents_waiting_and_links_to_them(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    assert "No agents waiting for approval" in html(admin_client.get("/admin/"))
    enroll("bob", ["anthropic"])
    enroll("carol", ["anthropic"])
    dave = enroll("dave", ["anthropic"], by=alice).agent
    agent_request_scopes(agent=dave, scopes=["anthropic-staging"])
    enroll("erin", ["anthropic"], by=alice)
    index = html(admin_client.get("/admin/"))
    assert "3 agents waiting for approval" in index
    assert f'href="{AGENTS}?waiting=yes"' in index
    assert "API docs" in index
    waiting = html(admin_client.get(f"{AGENTS}?waiting=yes"))
    assert all(name in waiting for name in ("bob", "carol", "dave"))
    assert "erin" not in waiting


def test_the_row_button_approves_and_grants_what_was_asked(
    admin_client: Client, both: list[str]
) -> None:
    bob = enroll("bob", both).agent
    response = admin_client.post(approve_url(bob), {"next": f"{AGENTS}?waiting=yes"})
    assert response.status_code == 302
    assert response["Location"] == f"{AGENTS}?waiting=yes"
    bob.refresh_from_db()
    assert bob.status == AgentStatus.APPROVED
    assert bob.decided_by is not None
    assert bob.decided_by.get_username() == "alice"
    assert agent_scopes(bob) == both
    page = html(admin_client.get(AGENTS))
    assert "Agent bob approved: granted anthropic, anthropic-staging" in page
    assert AuditEvent.objects.filter(action="agent.approved", actor="alice").exists()


def test_unchecking_a_scope_on_the_agent_page_narrows_the_grant(
    admin_client: Client, both: list[str]
) -> None:
    carol = enroll("carol", both).agent
    change = f"{AGENTS}{carol.pk}/change/"
    page = html(admin_client.get(change))
    assert page.count('name="scopes"') == 2
    assert page.count("checked") >= 2
    response = admin_client.post(
        approve_url(carol), {"narrowed": "1", "scopes": ["anthropic"], "next": change}
    )
    assert response["Location"] == change
    carol.refresh_from_db()
    assert carol.status == AgentStatus.APPROVED
    assert agent_scopes(carol) == ["anthropic"]
    assert carol.requested_scopes == []
    assert "declined anthropic-staging" in html(admin_client.get(change))


def test_a_scope_the_agent_never_asked_for_cannot_be_slipped_in(
    admin_client: Client, both: list[str]
) -> None:
    carol = enroll("carol", ["anthropic"]).agent
    admin_client.post(approve_url(carol), {"narrowed": "1", "scopes": ["anthropic-staging"]})
    carol.refresh_from_db()
    assert carol.status == AgentStatus.PENDING
    assert agent_scopes(carol) == []


def test_a_rejected_agent_cannot_mint(admin_client: Client, both: list[str]) -> None:
    bob = enroll("bob", ["anthropic"]).agent
    response = admin_client.post(reject_url(bob), {"reason": "who are you?"})
    assert response.status_code == 302
    bob.refresh_from_db()
    assert bob.status == AgentStatus.REJECTED
    assert "Agent bob rejected" in html(admin_client.get(AGENTS))
    assert AuditEvent.objects.get(action="agent.rejected").message == "who are you?"
    with pytest.raises(NotPermitted):
        token_issue(agent=bob, backend_name="anthropic")
    # A decided agent cannot be approved afterwards, and the admin is told why.
    admin_client.post(approve_url(bob))
    bob.refresh_from_db()
    assert bob.status == AgentStatus.REJECTED
    assert "Agent bob is rejected; it cannot be approved" in html(admin_client.get(AGENTS))


def test_rejecting_an_approved_agents_request_keeps_what_it_had(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    dave = enroll("dave", ["anthropic"], by=alice).agent
    agent_request_scopes(agent=dave, scopes=["anthropic-staging"])
    admin_client.post(reject_url(dave))
    dave.refresh_from_db()
    assert (dave.status, dave.requested_scopes) == (AgentStatus.APPROVED, [])
    assert agent_scopes(dave) == ["anthropic"]
    assert "Agent dave: request for anthropic-staging declined" in html(admin_client.get(AGENTS))


def test_bulk_actions_decide_for_each_agent(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    bob, carol = enroll("bob", ["anthropic"]).agent, enroll("carol", ["anthropic"]).agent
    erin = enroll("erin", ["anthropic"], by=alice).agent
    response = admin_client.post(
        AGENTS,
        {"action": "approve_selected", "_selected_action": [bob.pk, carol.pk]},
        follow=True,
    )
    page = html(response)
    assert "Agent bob approved" in page
    assert "Agent carol approved" in page
    assert set(Agent.objects.values_list("status", flat=True)) == {AgentStatus.APPROVED}
    frank, gina = enroll("frank", ["anthropic"]).agent, enroll("gina", ["anthropic"]).agent
    response = admin_client.post(
        AGENTS,
        {"action": "reject_selected", "_selected_action": [frank.pk, gina.pk, erin.pk]},
        follow=True,
    )
    page = html(response)
    assert "Agent frank rejected" in page
    assert "Agent gina rejected" in page
    # erin is approved and asks for nothing: an error for her, the others still decided.
    assert "Agent erin is approved; nothing waits for a decision" in page
    assert Agent.objects.get(name="frank").status == AgentStatus.REJECTED
    assert Agent.objects.get(name="erin").status == AgentStatus.APPROVED


def test_bulk_unenroll_asks_first_then_kills_every_token(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    erin = enroll("erin", ["anthropic"], by=alice).agent
    issued = token_issue(agent=erin, backend_name="anthropic")
    chosen = {"action": "unenroll_selected", "_selected_action": [erin.pk]}
    confirm = admin_client.post(AGENTS, chosen)
    assert confirm.status_code == 200
    assert "Unenroll these agents?" in html(confirm)
    erin.refresh_from_db()
    assert erin.status == AgentStatus.APPROVED
    response = admin_client.post(AGENTS, {**chosen, "post": "yes"}, follow=True)
    assert "Agent erin unenrolled; its tokens are revoked" in html(response)
    erin.refresh_from_db()
    assert erin.status == AgentStatus.UNENROLLED
    assert Token.objects.get(pk=issued.token.pk).revoked_at is not None


def test_the_revoke_button_revokes_a_token(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    erin = enroll("erin", ["anthropic"], by=alice).agent
    token = token_issue(agent=erin, backend_name="anthropic").token
    change = f"{AGENTS}{erin.pk}/change/"
    page = html(admin_client.get(change))
    revoke = f"/admin/broker/token/{token.pk}/revoke/"
    assert f'formaction="{revoke}"' in page
    assert "kb-token-status-live" in page
    response = admin_client.post(revoke, {"next": change})
    assert response["Location"] == change
    token.refresh_from_db()
    assert token.revoked_at is not None
    page = html(admin_client.get(change))
    assert f"Token {token.display_prefix}… revoked" in page
    assert "kb-token-status-revoked" in page
    assert f'formaction="{revoke}"' not in page
    assert AuditEvent.objects.filter(action="token.revoked", actor="alice").exists()


def test_revoke_selected_tokens_from_the_token_list(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    erin = enroll("erin", ["anthropic"], by=alice).agent
    tokens = [token_issue(agent=erin, backend_name="anthropic").token for _ in range(2)]
    listing = html(admin_client.get("/admin/broker/token/?state=live"))
    assert all(token.display_prefix in listing for token in tokens)
    response = admin_client.post(
        "/admin/broker/token/",
        {"action": "revoke_selected", "_selected_action": [t.pk for t in tokens]},
        follow=True,
    )
    assert "Revoked 2 tokens" in html(response)
    assert not Token.objects.filter(revoked_at__isnull=True).exists()
    assert "/admin/broker/token/add/" not in html(admin_client.get("/admin/broker/token/"))


def test_no_page_shows_a_vend_token_or_a_crd_token(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    erin = enroll("erin", both, by=alice)
    crd = token_issue(agent=erin.agent, backend_name="anthropic")
    bob = enroll("bob", ["anthropic"])
    token = Token.objects.get()
    pages = [
        admin_client.get("/admin/"),
        admin_client.get(AGENTS),
        admin_client.get(f"{AGENTS}{erin.agent.pk}/change/"),
        admin_client.get(f"{AGENTS}{bob.agent.pk}/change/"),
        admin_client.get("/admin/broker/token/"),
        admin_client.get(f"/admin/broker/token/{token.pk}/change/"),
        admin_client.get("/admin/audit/auditevent/"),
    ]
    secrets = [erin.vend_token, bob.vend_token, crd.plaintext, token.digest, erin.agent.vend_digest]
    for page in pages:
        assert page.status_code == 200
        assert not [secret for secret in secrets if secret in html(page)]
    # The prefixes are what the admin sees instead.
    assert f"{erin.agent.vend_prefix}…" in html(pages[2])
    assert f"{token.display_prefix}…" in html(pages[2])


def test_agents_cannot_be_added_edited_or_deleted_here(
    admin_client: Client, both: list[str]
) -> None:
    bob = enroll("bob", ["anthropic"]).agent
    assert admin_client.get(f"{AGENTS}add/").status_code == 403
    change = f"{AGENTS}{bob.pk}/change/"
    assert admin_client.post(change, {"name": "mallory"}).status_code == 403
    assert admin_client.post(f"{AGENTS}{bob.pk}/delete/").status_code == 403
    bob.refresh_from_db()
    assert (bob.name, bob.status) == ("bob", AgentStatus.PENDING)


def test_a_get_on_the_approve_url_changes_nothing(admin_client: Client, both: list[str]) -> None:
    bob = enroll("bob", ["anthropic"]).agent
    assert admin_client.get(approve_url(bob)).status_code == 405
    assert admin_client.get(reject_url(bob)).status_code == 405
    bob.refresh_from_db()
    assert bob.status == AgentStatus.PENDING


def test_charlie_who_is_not_staff_is_refused(both: list[str]) -> None:
    bob = enroll("bob", ["anthropic"]).agent
    get_user_model().objects.create_user("charlie", password="charlie-pw-123")
    charlie = Client()
    charlie.login(username="charlie", password="charlie-pw-123")
    for url in (approve_url(bob), reject_url(bob)):
        response = charlie.post(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    assert charlie.get(AGENTS)["Location"].startswith("/admin/login/")
    bob.refresh_from_db()
    assert bob.status == AgentStatus.PENDING


def test_staff_who_may_only_look_gets_no_buttons(both: list[str]) -> None:
    from django.contrib.auth.models import Permission

    bob = enroll("bob", ["anthropic"]).agent
    viewer = get_user_model().objects.create_user("vera", password="vera-pw-123", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_agent"))
    client = Client()
    client.force_login(viewer)
    listing = html(client.get(AGENTS))
    assert "bob" in listing
    assert 'class="button kb-approve"' not in listing
    assert "approve_selected" not in listing
    assert 'class="button kb-approve"' not in html(client.get(f"{AGENTS}{bob.pk}/change/"))
    assert client.post(approve_url(bob)).status_code == 403
    bob.refresh_from_db()
    assert bob.status == AgentStatus.PENDING


def test_the_agent_page_shows_its_recent_activity_and_links_to_all_of_it(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    erin = enroll("erin", ["anthropic"], by=alice).agent
    mine = token_issue(agent=erin, backend_name="anthropic").token
    other = enroll("frank", ["anthropic"], by=alice).agent
    theirs = token_issue(agent=other, backend_name="anthropic").token
    page = html(admin_client.get(f"{AGENTS}{erin.pk}/change/"))
    for action in ("agent.enrolled", "grant.added", "agent.approved", "token.issued"):
        assert action in page
    assert "admin: alice" in page
    assert "frank" not in page
    events = html(admin_client.get(f"/admin/audit/auditevent/?agent={erin.name}"))
    assert "token.issued" in events
    assert "frank" not in events
    tokens = html(admin_client.get(f"/admin/broker/token/?agent={erin.pk}"))
    assert mine.display_prefix in tokens
    assert theirs.display_prefix not in tokens


def test_a_live_token_can_be_revoked_from_its_own_page(
    admin_client: Client,
    alice: AbstractBaseUser,
    both: list[str],
) -> None:
    erin = enroll("erin", ["anthropic"], by=alice).agent
    token = token_issue(agent=erin, backend_name="anthropic").token
    page_url = f"/admin/broker/token/{token.pk}/change/"
    revoke = f"/admin/broker/token/{token.pk}/revoke/"
    assert f'formaction="{revoke}"' in html(admin_client.get(page_url))
    assert admin_client.get(revoke).status_code == 405
    response = admin_client.post(revoke, {"next": page_url})
    assert response["Location"] == page_url
    page = html(admin_client.get(page_url))
    assert f'formaction="{revoke}"' not in page
    assert "kb-token-status-revoked" in page
    # An outside "next" is ignored: the admin lands on the token list.
    again = admin_client.post(revoke, {"next": "https://evil.example/"})
    assert again["Location"] == "/admin/broker/token/"
