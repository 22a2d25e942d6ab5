"""The provider registry (issue 16, docs/providers.md): every kind speaks a registered wire,
and a provider that speaks a wire keybroker already carries is a registry entry alone."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from django.contrib.auth.models import AbstractBaseUser

from audit.models import AuditEvent
from broker.kinds import PROVIDERS, OpenAIProvider
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.tokens import token_issue
from proxy.providers import ANTHROPIC, OPENAI, WIRES, wire_for
from tests.fake_openai import (
    CACHED_TOKENS,
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    REPLY_TEXT,
    FakeOpenAI,
)
from tests.proxy_cast import audit_drained

KEY = "sk-" + "C0" * 30 + "mpat"


def test_every_kind_names_a_registered_wire() -> None:
    assert {kind: provider.dialect in WIRES for kind, provider in PROVIDERS.items()} == {
        kind: True for kind in PROVIDERS
    }
    assert (wire_for("anthropic"), wire_for("anthropic-wif"), wire_for("openai")) == (
        ANTHROPIC,
        ANTHROPIC,
        OPENAI,
    )


@pytest.mark.django_db(transaction=True)
def test_an_openai_compatible_provider_is_a_registry_entry_alone(
    live_url: str,
    fake_openai: FakeOpenAI,
    alice: AbstractBaseUser,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.PUBLIC_URL = live_url
    compatible = OpenAIProvider(
        kind="compatible",
        label="An OpenAI-compatible API",
        default_base_url=fake_openai.url,
        models_path="/v1/models",
        dialect="openai",
        sdk_path="/v1",
    )
    monkeypatch.setitem(PROVIDERS, "compatible", compatible)
    fake_openai.valid_keys.add(KEY)
    backend_add(name="compatible", kind="compatible", secret=KEY)
    agent = agent_enroll(name="bob", scopes=["compatible"], approved_by=alice).agent
    token = token_issue(agent=agent, backend_name="compatible", ttl="30m").plaintext
    client = openai.OpenAI(
        base_url=f"{live_url}/v1/proxy/compatible/v1", api_key=token, max_retries=0
    )

    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == REPLY_TEXT
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(
            base_url=f"{live_url}/v1/proxy/compatible/v1", api_key="crd_not-a-token", max_retries=0
        ).models.list()

    assert set(fake_openai.seen_keys()) == {KEY}
    # The wire came with the dialect: OpenAI's error shape, OpenAI's usage read.
    assert refused.value.body is not None
    assert set(refused.value.body) >= {"message", "type", "code"}  # type: ignore[arg-type]
    audit_drained()
    event = AuditEvent.objects.get(action="proxy.request", backend="compatible", status=200)
    assert (event.input_tokens, event.cache_read_tokens, event.output_tokens) == (
        PROMPT_TOKENS - CACHED_TOKENS,
        CACHED_TOKENS,
        COMPLETION_TOKENS,
    )
