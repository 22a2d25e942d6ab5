"""An agent's whole life through a real server and a real socket."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command

from broker.models import Backend, Token

pytestmark = pytest.mark.django_db(transaction=True)


def manage(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_enroll_wait_approve_by_cli_mint_list_revoke(live_url: str, anthropic: Backend) -> None:
    with httpx.Client(base_url=live_url, timeout=10) as http:
        enrolled = http.post("/v1/enroll", json={"name": "bob", "scopes": ["anthropic"]})
        assert enrolled.status_code == 201
        bob: dict[str, Any] = {"Authorization": f"Bearer {enrolled.json()['vend_token']}"}

        refused = http.post("/v1/credentials/anthropic", json={"ttl": "30m"}, headers=bob)
        assert refused.status_code == 403
        assert "pending approval" in refused.json()["error"]["message"]
        assert "bob" in manage("agent", "pending")

        assert "approved bob; it may use: anthropic" in manage("agent", "approve", "bob")

        minted = http.post("/v1/credentials/anthropic", json={"ttl": "30m"}, headers=bob)
        assert minted.status_code == 201
        token = minted.json()
        assert token["ttl"] == 1800
        active = http.get("/v1/active", headers=bob).json()
        assert [t["id"] for t in active] == [token["id"]]
        assert token["id"] in manage("token", "ls", "--agent", "bob")

        assert http.delete(f"/v1/active/{token['id']}", headers=bob).status_code == 204
        assert http.get("/v1/active", headers=bob).json() == []
        assert Token.objects.get().revoked_at is not None

        again = http.post("/v1/credentials/anthropic", json={}, headers=bob).json()
        assert manage("token", "revoke", again["id"]).startswith("revoked crd_")
        assert "no tokens" in manage("token", "ls")

        assert "unenrolled bob" in manage("agent", "unenroll", "bob")
        assert http.get("/v1/enroll/status", headers=bob).status_code == 401


def test_the_agent_cli_commands_refuse_in_one_line(anthropic: Backend) -> None:
    with pytest.raises(CommandError, match="no enrolled agent named 'ghost'"):
        manage("agent", "approve", "ghost")
    with pytest.raises(CommandError, match="no token with id nope"):
        manage("token", "revoke", "nope")
    created = io.StringIO()
    call_command(
        "agent", "create", "ci", "--can", "anthropic", stdout=created, stderr=io.StringIO()
    )
    assert created.getvalue().startswith("ckr_")
    assert "ci" in manage("agent", "ls")
    assert "anthropic" in manage("agent", "grants", "ci")
    with pytest.raises(CommandError, match="no backend named 'nope'"):
        manage("agent", "grant", "ci", "nope")
    with pytest.raises(CommandError, match="nothing waits for a decision"):
        manage("agent", "reject", "ci")


def test_agent_ungrant_from_the_command_line(anthropic: Backend) -> None:
    call_command("agent", "create", "ci", "--can", "anthropic", stdout=io.StringIO(),
                 stderr=io.StringIO())  # fmt: skip
    assert "ci may no longer use anthropic (0 token(s) revoked)" in manage(
        "agent", "ungrant", "ci", "anthropic"
    )
    with pytest.raises(CommandError, match="holds no grant for backend anthropic"):
        manage("agent", "ungrant", "ci", "anthropic")
