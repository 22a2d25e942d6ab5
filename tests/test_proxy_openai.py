"""OpenAI beside Anthropic (issue 16): the official `openai` SDK through keybroker's proxy on
a real server, against a fake OpenAI upstream on a real socket (tests/fake_openai.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from audit.models import AuditEvent
from broker.infra.errors import ServiceError
from broker.models import Agent, Backend
from broker.selectors.policy import policy_left
from broker.services.access import access_changed
from broker.services.admin_tokens import admintoken_create
from broker.services.agents import agent_approve, agent_enroll
from broker.services.backend_keys import key_add
from broker.services.backends import backend_add, backend_validate
from broker.services.policy import grant_policy, grant_update
from broker.services.tokens import token_issue
from tests.conftest import REPO, clean_env
from tests.fake_openai import (
    CACHED_TOKENS,
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    REPLY_TEXT,
    FakeOpenAI,
    openai_error,
)
from tests.proxy_cast import audit_drained
from tests.servers import process_env
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(
    transaction=True
)  # the live server and subprocesses see the rows

KEY = "sk-proj-" + "Q7" * 40 + "Op3n"
MODEL = "gpt-4o-mini"
HELLO = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class OpenAIProxied:
    base_url: str  # what the SDK gets: {live_url}/v1/proxy/openai/v1
    token: str
    backend: Backend


@pytest.fixture
def proxied(
    live_url: str, fake_openai: FakeOpenAI, alice: AbstractBaseUser, settings: Any
) -> Iterator[OpenAIProxied]:
    settings.PUBLIC_URL = live_url
    fake_openai.valid_keys.add(KEY)
    backend = backend_add(name="openai", kind="openai", secret=KEY, base_url=fake_openai.url)
    agent = agent_enroll(name="bob", scopes=["openai"], approved_by=alice).agent
    issued = token_issue(agent=agent, backend_name="openai", ttl="30m")
    yield OpenAIProxied(f"{live_url}/v1/proxy/openai/v1", issued.plaintext, backend)
    audit_drained()


def sdk(proxied: OpenAIProxied) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxied.base_url, api_key=proxied.token, max_retries=0)


def only_the_real_key_went_upstream(fake: FakeOpenAI, proxied: OpenAIProxied) -> None:
    assert fake.requests, "nothing reached the upstream"
    assert set(fake.seen_keys()) == {KEY}
    assert all(proxied.token not in str(seen.headers) for seen in fake.requests)


def test_chat_completions_json_and_streamed_through_the_sdk(
    proxied: OpenAIProxied, fake_openai: FakeOpenAI
) -> None:
    client = sdk(proxied)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == REPLY_TEXT
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == PROMPT_TOKENS

    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY_TEXT
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)
    only_the_real_key_went_upstream(fake_openai, proxied)
    assert {seen.path for seen in fake_openai.requests} == {"/v1/chat/completions"}
    # OpenAI's wire: no Anthropic header added on the way.
    assert all("anthropic-version" not in seen.headers for seen in fake_openai.requests)


async def test_async_chat_and_responses_streaming(
    proxied: OpenAIProxied, fake_openai: FakeOpenAI
) -> None:
    client = openai.AsyncOpenAI(base_url=proxied.base_url, api_key=proxied.token, max_retries=0)
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == REPLY_TEXT

    async with client.responses.stream(model=MODEL, input="Hi") as stream:
        deltas = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()
    assert "".join(deltas) == REPLY_TEXT
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
    )
    assert final.usage.input_tokens_details.cached_tokens == CACHED_TOKENS
    await client.close()
    only_the_real_key_went_upstream(fake_openai, proxied)


def test_embeddings_models_and_a_file_upload(
    proxied: OpenAIProxied, fake_openai: FakeOpenAI
) -> None:
    client = sdk(proxied)
    embedded = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [item.index for item in embedded.data] == [0, 1]
    assert MODEL in {model.id for model in client.models.list()}
    uploaded = client.files.create(
        file=("notes.jsonl", io.BytesIO(b'{"a": 1}\n' * 1000)), purpose="batch"
    )
    assert uploaded.bytes == 9000
    assert [u.size for u in fake_openai.uploads] == [9000]
    only_the_real_key_went_upstream(fake_openai, proxied)


def test_keybrokers_refusals_come_in_openais_error_shape(
    proxied: OpenAIProxied, fake_openai: FakeOpenAI
) -> None:
    wrong = openai.OpenAI(base_url=proxied.base_url, api_key="crd_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.body == {
        "message": "invalid token",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }

    grant = proxied.backend.grants.get()
    grant_update(grant=grant, policy={"models": ["gpt-4o-*"], "max_tokens": 100})
    client = sdk(proxied)
    with pytest.raises(openai.PermissionDeniedError) as outside:
        client.chat.completions.create(model="o3-pro", messages=HELLO, max_completion_tokens=10)  # type: ignore[arg-type]
    assert "model 'o3-pro' is not allowed" in outside.value.message
    assert isinstance(outside.value.body, dict)
    assert outside.value.body["type"] == "permission_error"
    # Under a cap, a call that names none would write up to the model's limit.
    with pytest.raises(openai.PermissionDeniedError) as uncapped:
        client.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert "max_completion_tokens must be set, at most 100" in uncapped.value.message
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=101)
    assert fake_openai.requests == []  # nothing refused went upstream


def test_an_openai_key_is_validated_against_the_models_list(
    fake_openai: FakeOpenAI, live_url: str
) -> None:
    fake_openai.valid_keys.add(KEY)
    backend = backend_add(name="openai", kind="openai", secret=KEY, base_url=fake_openai.url)
    assert backend.secret_fingerprint == "sk-proj-…Op3n"
    assert backend_validate(backend=backend).state == "valid"
    assert fake_openai.seen_keys() == [KEY]
    fake_openai.valid_keys.clear()
    assert backend_validate(backend=backend).state == "invalid"


def test_an_anthropic_key_is_not_an_openai_key_and_agents_own_keys_are_refused(
    fake_openai: FakeOpenAI,
) -> None:
    with pytest.raises(ServiceError, match="an OpenAI secret is an API key"):
        backend_add(
            name="openai",
            kind="openai",
            secret="sk-ant-api03-" + "x" * 40,
            base_url=fake_openai.url,
        )
    with pytest.raises(ServiceError, match="cannot use the agents' own keys"):
        backend_add(name="openai", kind="openai", client_key=True, base_url=fake_openai.url)
    assert not Backend.objects.exists()


def proxied_events() -> list[AuditEvent]:
    audit_drained()
    return list(AuditEvent.objects.filter(action="proxy.request").order_by("created_at", "id"))


def test_openai_usage_is_audited_and_counted_by_policy(
    proxied: OpenAIProxied, fake_openai: FakeOpenAI
) -> None:
    grant = proxied.backend.grants.get()
    grant_update(grant=grant, policy={"daily_tokens": 10_000})
    client = sdk(proxied)
    client.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with client.responses.stream(model=MODEL, input="Hi") as stream:
        stream.get_final_response()
    list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))  # type: ignore[arg-type]

    metered, streamed, responses, unasked = proxied_events()
    for event in (metered, streamed, responses):
        # OpenAI's prompt count includes its cached part; keybroker keeps them apart, as
        # Anthropic reports them (docs/providers.md).
        assert (event.input_tokens, event.output_tokens, event.cache_read_tokens) == (
            PROMPT_TOKENS - CACHED_TOKENS,
            COMPLETION_TOKENS,
            CACHED_TOKENS,
        )
        assert (event.model, event.status, event.backend) == (MODEL, 200, "openai")
    assert (streamed.streamed, responses.path) == (True, "/v1/responses")
    assert unasked.input_tokens is None
    assert "include_usage" in unasked.detail["unmetered"]
    counted = 3 * (PROMPT_TOKENS + COMPLETION_TOKENS)
    wait_until(
        lambda: policy_left(grant_policy(grant))["daily_tokens"]["used"] == counted,
        timeout=5,
        what=f"{counted} tokens counted against the daily budget",
    )


def test_keybroker_env_openai_sets_up_the_openai_sdk(
    live_url: str,
    fake_openai: FakeOpenAI,
    alice: AbstractBaseUser,
    tmp_path: Path,
    settings: Any,
) -> None:
    settings.PUBLIC_URL = live_url
    fake_openai.valid_keys.add(KEY)
    backend_add(name="openai", kind="openai", secret=KEY, base_url=fake_openai.url)
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path))
    cli = f"{sys.executable} -m keybroker.cli"
    enrolled = subprocess.run(
        [*cli.split(), "enroll", live_url, "--name", "bob", "--can", "openai", "--timeout", "0"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    agent_approve(agent=Agent.objects.get(name="bob"), by=alice)
    script = (
        f'eval "$({cli} env openai --ttl 5m)" || exit 9\n'
        'printf "%s\\n" "$OPENAI_BASE_URL"\n'
        f"{sys.executable} -c 'import openai; c = openai.OpenAI(max_retries=0); "
        f'print(c.chat.completions.create(model="{MODEL}", messages=[{{"role": "user", '
        '"content": "Hi"}]).choices[0].message.content)\'\n'
    )
    result = subprocess.run(
        ["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{live_url}/v1/proxy/openai/v1", REPLY_TEXT]
    assert fake_openai.seen_keys() == [KEY]


def test_an_openai_backend_through_the_admin_and_the_rest_api(
    alice: AbstractBaseUser, fake_openai: FakeOpenAI
) -> None:
    admin_client = Client()
    admin_client.force_login(alice)
    added = admin_client.post(
        "/admin/broker/backend/add/",
        {
            "name": "openai", "kind": "openai", "base_url": "", "new_secret": KEY,
            "token_ttl_min": 60, "token_ttl_default": 600, "token_ttl_max": 3600,
            "enabled": "on",
        },
    )  # fmt: skip
    assert added.status_code == 302, added.content.decode()[:2000]
    backend = Backend.objects.get()
    assert (backend.kind, backend.base_url) == ("openai", "https://api.openai.com")
    listing = admin_client.get("/admin/broker/backend/").content.decode()
    assert "sk-proj-…Op3n" in listing
    assert KEY not in listing

    api = Client(
        HTTP_AUTHORIZATION=f"Bearer {admintoken_create(name='ci', username='alice').plaintext}"
    )
    inspected = api.get("/v1/admin/backends/openai").json()
    assert (inspected["kind"], inspected["auth_scheme"]) == ("openai", "bearer-key")
    refused = api.post(
        "/v1/admin/backends/",
        json.dumps({"name": "openai-2", "kind": "openai", "secret": "sk-ant-api03-" + "x" * 40}),
        content_type="application/json",
    )
    assert refused.status_code == 400
    assert "an OpenAI secret is an API key" in refused.json()["error"]["message"]


def test_a_pool_of_openai_keys_fails_over_to_the_second(
    proxied: OpenAIProxied, fake_openai: FakeOpenAI
) -> None:
    second = "sk-proj-" + "S2" * 40 + "2nd0"
    fake_openai.valid_keys.add(second)
    key_add(backend=proxied.backend, secret=second)
    access_changed()  # outside a transaction: the live server drops its cached route now
    fake_openai.answer_next(503, openai_error("overloaded", "server_error"))
    answer = sdk(proxied).chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == REPLY_TEXT
    (event,) = proxied_events()
    assert (event.status, event.detail["retried"], event.detail["failed_status"]) == (
        200,
        True,
        503,
    )
    first, retried = fake_openai.seen_keys()
    assert {first, retried} == {KEY, second}  # the 503's key, then the other


def test_manage_py_backend_add_openai_reads_the_key_from_stdin(fake_openai: FakeOpenAI) -> None:
    fake_openai.valid_keys.add(KEY)
    added = subprocess.run(
        [sys.executable, "manage.py", "backend", "add", "openai", "--kind", "openai",
         "--api-key", "-", "--base-url", fake_openai.url],
        input=KEY + "\n", env=process_env(), cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "added backend openai (sk-proj-…Op3n)" in added.stdout
    assert KEY not in added.stdout + added.stderr
    assert backend_validate(backend=Backend.objects.get(name="openai")).state == "valid"
