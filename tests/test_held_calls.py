"""Calls a person must approve (issue 18, part 2): bob's grant holds some of his calls until
alice decides; the fake upstream hears only of what she approved."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.core.management import call_command

from audit.models import AuditEvent
from broker.infra.errors import Conflict, NotFound
from broker.selectors.held import held_calls_waiting
from broker.services.admin_tokens import admintoken_create
from broker.services.held import HeldCall, held_call_decide
from tests.conftest import REPO, free_port
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied, audit_drained
from tests.servers import process_env, uvicorn_started
from tests.test_policy_proxy import HAIKU, HELLO, OPUS, bobs_grant, sdk, set_policy
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def held_now(count: int = 1) -> list[HeldCall]:
    """The calls held across every process, once there are ``count`` of them."""
    return wait_until(
        lambda: calls if len(calls := held_calls_waiting()) == count else None,
        timeout=10,
        what=lambda: f"{count} held call(s) (there are {len(held_calls_waiting())})",
    )


def in_thread(pool: ThreadPoolExecutor, call: Callable[..., Any], **kwargs: Any) -> Future[Any]:
    return pool.submit(call, **kwargs)


def events(action: str) -> list[AuditEvent]:
    audit_drained()
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


def test_an_approved_call_goes_upstream_as_sent_and_the_trail_says_who_approved(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser
) -> None:
    set_policy(hold={"models": ["claude-opus-*"]})
    client = sdk(proxied)
    # A call the rule does not match goes on at once.
    assert client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO).usage
    assert len(fake_anthropic.requests) == 1
    with ThreadPoolExecutor(1) as pool:
        answer = in_thread(
            pool,
            client.messages.with_raw_response.create,
            model=OPUS,
            max_tokens=8,
            messages=HELLO,
        )
        (call,) = held_now()
        assert (call.agent, call.backend, call.model, call.rule) == (
            "bob",
            "anthropic",
            OPUS,
            "models",
        )
        assert (call.method, call.path, call.max_tokens) == ("POST", "/v1/messages", 8)
        # Held: the client has nothing yet, and the upstream heard nothing.
        assert not answer.done()
        assert len(fake_anthropic.requests) == 1
        held_call_decide(held_id=call.id, approve=True, by=alice)
        raw = answer.result(timeout=10)
    assert raw.parse().model == OPUS
    # keybroker's own time leaves the wait out, and says how long it was.
    assert "held;dur=" in raw.headers["server-timing"]
    sent = fake_anthropic.requests[1]
    assert json.loads(sent.body) == {"model": OPUS, "max_tokens": 8, "messages": HELLO}
    assert sent.headers["x-api-key"] == proxied.key
    assert len(fake_anthropic.requests) == 2
    assert held_calls_waiting() == []

    (held,) = events("proxy.held")
    assert (held.agent, held.model, held.detail["hold_id"]) == ("bob", OPUS, call.id)
    assert held.detail["hold_rule"] == "models"
    (decided,) = events("proxy.hold_decided")
    assert (decided.actor_type, decided.actor) == ("admin", "alice")
    assert decided.detail["decision"] == "approved"
    assert decided.detail["decided_by"] == "alice"
    request = AuditEvent.objects.filter(action="proxy.request", model=OPUS).get()
    assert request.status == 200
    assert request.detail["hold_decision"] == "approved"
    assert request.detail["held_ms"] > 0


def test_a_denied_call_never_reaches_upstream_and_the_sdk_reads_who_and_why(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser
) -> None:
    set_policy(hold={"max_tokens_above": 1000})
    client = sdk(proxied)
    with ThreadPoolExecutor(1) as pool:
        answer = in_thread(
            pool, client.messages.create, model=HAIKU, max_tokens=4000, messages=HELLO
        )
        (call,) = held_now()
        assert call.rule == "max_tokens_above"
        held_call_decide(held_id=call.id, approve=False, by=alice, reason="too long an answer")
        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            answer.result(timeout=10)
    assert "held for approval and denied by alice: too long an answer" in denied.value.message
    assert fake_anthropic.requests == []
    # Decided once: a second decision is a conflict that names the first.
    with pytest.raises(Conflict, match="already denied by alice"):
        held_call_decide(held_id=call.id, approve=True, by=alice)
    (refused,) = events("policy.denied")
    assert (refused.status, refused.detail["policy_rule"]) == (403, "hold")
    assert refused.detail["hold_decision"] == "denied"
    (decided,) = events("proxy.hold_decided")
    assert (decided.actor, decided.detail["reason"]) == ("alice", "too long an answer")


def test_nobody_deciding_in_time_is_a_403_naming_the_timeout(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser
) -> None:
    set_policy(hold={"all": True, "timeout": 5})
    answer = httpx.get(
        f"{proxied.base_url}/v1/models", headers={"x-api-key": proxied.token}, timeout=30
    )
    assert answer.status_code == 403
    error = answer.json()["error"]
    assert error["type"] == "permission_error"
    assert "held for approval for 5s, and nobody decided" in error["message"]
    assert answer.headers["x-should-retry"] == "false"
    assert fake_anthropic.requests == []
    assert held_calls_waiting() == []
    (decided,) = events("proxy.hold_decided")
    assert (decided.detail["decision"], decided.actor_type) == ("expired", "agent")
    with pytest.raises(Conflict, match="already expired"):
        held_call_decide(held_id=decided.detail["hold_id"], approve=True, by=alice)


def test_an_approved_stream_streams(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser
) -> None:
    set_policy(hold={"paths": ["/v1/messages"]})

    def streamed() -> list[str]:
        with sdk(proxied).messages.stream(model=HAIKU, max_tokens=8, messages=HELLO) as stream:
            return list(stream.text_stream)

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(streamed)
        (call,) = held_now()
        assert (call.stream, call.rule) == (True, "paths")
        held_call_decide(held_id=call.id, approve=True, by=alice)
        texts = answer.result(timeout=10)
    assert len(texts) == fake_anthropic.stream_deltas
    assert len(fake_anthropic.requests) == 1
    (request,) = events("proxy.request")
    assert (request.streamed, request.detail["hold_decision"]) == (True, "approved")


def test_a_decision_in_another_web_process_reaches_the_holding_one(
    proxied: Proxied,
    fake_anthropic: FakeAnthropic,
    second_process: str,
    alice: AbstractBaseUser,
) -> None:
    set_policy(hold={"all": True})
    token = admintoken_create(name="ops", username="alice").plaintext
    admin = httpx.Client(
        base_url=second_process, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    with ThreadPoolExecutor(2) as pool:
        first = in_thread(pool, sdk(proxied).models.list)
        second = in_thread(pool, sdk(proxied).models.list)
        calls = held_now(2)
        listed = admin.get("/v1/admin/held/")
        assert sorted(c["id"] for c in listed.json()) == sorted(c.id for c in calls)
        approved = admin.post(f"/v1/admin/held/{calls[0].id}/approve")
        assert approved.status_code == 200, approved.text
        denied = admin.post(f"/v1/admin/held/{calls[1].id}/deny", json={"reason": "one is enough"})
        assert denied.status_code == 200, denied.text
        results = []
        for future in (first, second):
            try:
                results.append(future.result(timeout=10))
            except anthropic.PermissionDeniedError as refused:
                results.append(refused.message)
    assert sum(1 for r in results if isinstance(r, str) and "one is enough" in r) == 1
    assert len(fake_anthropic.requests) == 1
    # Decided already, or never held: the REST API says which.
    again = admin.post(f"/v1/admin/held/{calls[0].id}/deny")
    assert again.status_code == 409
    assert "already approved by alice" in again.json()["error"]["message"]
    unknown = admin.post("/v1/admin/held/hld_0000000000000000/approve")
    assert unknown.status_code == 404
    bad = admin.post(f"/v1/admin/held/{calls[0].id}/deny", json={"reason": 7})
    assert bad.status_code == 400


def test_a_client_that_hangs_up_withdraws_its_hold(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser
) -> None:
    set_policy(hold={"all": True})
    with ThreadPoolExecutor(1) as pool:
        gone = pool.submit(
            httpx.get,
            f"{proxied.base_url}/v1/models",
            headers={"x-api-key": proxied.token},
            timeout=httpx.Timeout(10, read=1),
        )
        (call,) = held_now()
        with pytest.raises(httpx.ReadTimeout):
            gone.result(timeout=10)
    wait_until(lambda: held_calls_waiting() == [], timeout=10, what="the hold to be withdrawn")
    with pytest.raises(Conflict, match="already withdrawn"):
        held_call_decide(held_id=call.id, approve=True, by=alice)
    assert fake_anthropic.requests == []
    (decided,) = events("proxy.hold_decided")
    assert decided.detail["decision"] == "withdrawn"
    (request,) = events("proxy.request")
    assert request.outcome == "client_gone"


def test_a_grant_without_a_hold_is_not_held(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(models=["claude-*"])
    answer = httpx.post(
        f"{proxied.base_url}/v1/messages",
        headers={"x-api-key": proxied.token},
        json={"model": HAIKU, "max_tokens": 8, "messages": HELLO},
        timeout=10,
    )
    assert answer.status_code == 200
    assert "held;" not in answer.headers["server-timing"]
    assert events("proxy.held") == []
    assert "hold_id" not in AuditEvent.objects.get(action="proxy.request").detail


def test_a_restart_denies_the_calls_it_held(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser
) -> None:
    set_policy(hold={"all": True})
    env = process_env(KEYBROKER_PUBLIC_URL=proxied.base_url)
    with uvicorn_started(port=free_port(), env=env) as (url, process):
        base = f"{url}/v1/proxy/anthropic"
        with ThreadPoolExecutor(1) as pool:
            answer = in_thread(pool, sdk(proxied, base_url=base).models.list)
            held_now()
            process.terminate()
            with pytest.raises(anthropic.PermissionDeniedError) as denied:
                answer.result(timeout=30)
    assert "denied by keybroker (stopping): keybroker stopped" in denied.value.message
    assert fake_anthropic.requests == []
    assert held_calls_waiting() == []


# --- the hold rule, as policy -----------------------------------------------------------
@pytest.mark.parametrize(
    ("hold", "says"),
    [
        ("all", "give an object"),
        ({"everything": True}, "unknown key(s) everything"),
        ({"all": "yes"}, "all: must be true or false"),
        ({"models": "claude-opus-*"}, "models: give a list of glob patterns"),
        ({"paths": ["v1/messages"]}, "paths: 'v1/messages' must start with /"),
        ({"max_tokens_above": -1}, "max_tokens_above: must be a whole number, 0 or more"),
        ({"all": True, "timeout": 2}, "timeout: must be 5s to 1h, not 2s"),
        ({"all": True, "timeout": "1d"}, "timeout: '1d' is not a duration"),
        ({"timeout": 60}, "holds no call"),
    ],
)
def test_a_bad_hold_rule_is_a_400_naming_it_and_changes_nothing(
    admin_api: Any, anthropic: Any, hold: Any, says: str
) -> None:
    from tests.agents import as_agent, enroll, send

    agent, vend = enroll()
    send(admin_api, "post", f"/v1/admin/pending/{agent.pk}/approve", {})
    url = f"/v1/admin/agents/{agent.pk}/grants/anthropic"
    assert send(admin_api, "patch", url, {"hold": {"all": True}}).status_code == 200
    refused = send(admin_api, "patch", url, {"hold": hold, "rpm": 5})
    assert refused.status_code == 400, refused.content
    assert says in refused.json()["error"]["fields"]["hold"][0]
    body = send(admin_api, "get", url).json()
    assert body["policy"]["hold"] == {
        "all": True, "models": [], "paths": [], "max_tokens_above": None, "timeout": 120,
    }  # fmt: skip
    assert body["policy"]["rpm"] is None
    # The agent reads it too: why a call of its may wait, and for how long.
    (grant,) = send(as_agent(vend), "get", "/v1/status").json()["grants"]
    assert grant["limits"]["hold"] == body["policy"]["hold"]


def test_the_cli_sets_a_hold_rule_and_decides_held_calls(
    proxied: Proxied, fake_anthropic: FakeAnthropic, capsys: Any
) -> None:
    call_command("agent", "grant", "bob", "anthropic", "--hold", "models=claude-opus-*; timeout=2m")
    assert "hold models=claude-opus-*; timeout=2m" in capsys.readouterr().out
    assert bobs_grant().hold == {
        "all": False, "models": ["claude-opus-*"], "paths": [], "max_tokens_above": None,
        "timeout": 120,
    }  # fmt: skip
    call_command("held", "ls")
    assert "no call is held" in capsys.readouterr().out
    with ThreadPoolExecutor(1) as pool:
        answer = in_thread(
            pool, sdk(proxied).messages.create, model=OPUS, max_tokens=8, messages=HELLO
        )
        (call,) = held_now()
        call_command("held", "ls")
        listed = capsys.readouterr().out
        assert call.id in listed
        assert "claude-opus-4-1" in listed
        call_command("held", "deny", call.id, "--reason", "not from the shell")
        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            answer.result(timeout=10)
    assert "denied by manage.py held: not from the shell" in denied.value.message
    with pytest.raises(NotFound):
        held_call_decide(held_id="hld_ffffffffffffffff", approve=True, by=None)
    # Unknown to a command: a one-line error and exit code 1.
    refused = subprocess.run(
        [sys.executable, "manage.py", "held", "approve", "hld_nope"],
        cwd=REPO, env=process_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "no held call 'hld_nope'" in refused.stderr
    call_command("agent", "grant", "bob", "anthropic", "--hold", "default")
    assert bobs_grant().hold is None


def test_a_call_to_hold_while_redis_is_unreachable_is_a_503_and_never_goes_upstream(
    proxied: Proxied, fake_anthropic: FakeAnthropic, settings: Any
) -> None:
    set_policy(hold={"all": True})
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    answer = httpx.get(
        f"{proxied.base_url}/v1/models", headers={"x-api-key": proxied.token}, timeout=30
    )
    assert answer.status_code == 503
    assert "held calls cannot be recorded right now" in answer.json()["error"]["message"]
    assert fake_anthropic.requests == []


def test_the_activity_page_offers_the_buttons_only_to_who_may_decide(
    alice: AbstractBaseUser,
) -> None:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.test import Client

    vera = get_user_model().objects.create_user("vera", password="vera-pw-123", is_staff=True)
    vera.user_permissions.add(Permission.objects.get(codename="view_auditevent"))
    for user, may in ((vera, False), (alice, True)):
        client = Client()
        client.force_login(user)
        page = client.get("/activity/")
        assert page.status_code == 200
        assert page.context["kb_settings"]["can_decide"] is may
        assert 'id="kb-held"' in page.content.decode()


def test_a_token_revoked_while_its_call_was_held_is_not_let_through_by_the_approval(
    proxied: Proxied, fake_anthropic: FakeAnthropic, alice: AbstractBaseUser
) -> None:
    from broker.models import Token
    from broker.services.tokens import token_revoke

    set_policy(hold={"all": True})
    with ThreadPoolExecutor(1) as pool:
        answer = in_thread(pool, sdk(proxied).models.list)
        (call,) = held_now()
        token_revoke(token=Token.objects.get(pk=proxied.token_id), by=alice)
        held_call_decide(held_id=call.id, approve=True, by=alice)
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            answer.result(timeout=10)
    assert "approved while held, but meanwhile: token revoked" in refused.value.message
    assert fake_anthropic.requests == []


@pytest.mark.parametrize(
    ("rule", "path", "body", "held_by"),
    [
        ({"all": True}, "/v1/models", b"", "all"),
        ({"paths": ["/v1/messages/batches**"]}, "/v1/messages/batches/b1/results", b"", "paths"),
        # * stays within a segment, as in the allow list.
        ({"paths": ["/v1/messages*"]}, "/v1/messages/batches", b"", None),
        ({"models": ["claude-opus-*"]}, "/v1/messages", b'{"model": "claude-opus-4-1"}', "models"),
        ({"models": ["claude-opus-*"]}, "/v1/messages", b'{"model": "claude-haiku-4-5"}', None),
        # Each request of a batch is read, as the allow list reads them.
        (
            {"models": ["claude-opus-*"]},
            "/v1/messages/batches",
            b'{"requests": [{"custom_id": "a", "params": {"model": "claude-haiku-4-5"}},'
            b' {"custom_id": "b", "params": {"model": "claude-opus-4-1"}}]}',
            "models",
        ),
        ({"max_tokens_above": 100}, "/v1/messages", b'{"max_tokens": 101}', "max_tokens_above"),
        ({"max_tokens_above": 100}, "/v1/messages", b'{"max_tokens": 100}', None),
        ({"max_tokens_above": 0}, "/v1/messages", b'{"max_tokens": true}', None),
    ],
)
def test_which_calls_a_hold_rule_holds(
    rule: dict[str, Any], path: str, body: bytes, held_by: str | None
) -> None:
    from broker.services.policy import hold_rule_of
    from proxy.policy import hold_match

    held = hold_rule_of(rule)
    assert held is not None
    assert hold_match(held, path=path, headers=[], body=body) == held_by
