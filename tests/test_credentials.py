"""Tokens that renew themselves (issue 18, part 1): keybroker.Credentials driving the real
anthropic SDK through the live proxy across several expiries of 1-minute tokens, and
`keybroker get --cached` shared by real processes.

Expiry without waiting minutes: the provider's clock is moved past each token's renewal
point, and the server ends the old token for real (its expiry set in the past, every proxy
told), so a provider that did not renew would have its call refused with a 401. The SDK
runs with max_retries=0 there, so such a 401 would fail the test instead of being retried.
"""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import anthropic
import httpx
import pytest
from django.db import connections
from django.utils import timezone

import keybroker
from broker.models import Agent, Token
from broker.services.access import access_changed
from broker.services.tokens import token_revoke
from keybroker import cli
from keybroker.credentials import CACHE_FILE, CachedToken, TokenStore, cache_key, renew_margin
from tests.conftest import REPO, clean_env
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Enrolled

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "claude-haiku-4-5"
HELLO = [{"role": "user", "content": "Hello"}]


class Clock:
    """The wall clock, moved forward on demand: the provider's idea of now."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped


@pytest.fixture
def bob(bob_enrolled: Enrolled) -> Enrolled:
    return bob_enrolled


def tokens_of(agent: Agent) -> list[Token]:
    return list(Token.objects.filter(agent=agent).order_by("created_at"))


def end_for_real(token: Token) -> None:
    """The token's expiry moved into the past on the server, and every proxy told."""
    Token.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    access_changed()


def refused(base_url: str, token: str) -> int:
    response = httpx.post(
        f"{base_url}/v1/messages",
        headers={"authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 8, "messages": HELLO},
        timeout=30,
    )
    return response.status_code


def test_the_sdk_runs_across_several_expiries_of_one_minute_tokens(
    bob: Enrolled, fake_anthropic: FakeAnthropic
) -> None:
    clock = Clock()
    creds = keybroker.Credentials("anthropic", ttl="1m", config=bob.config, clock=clock)
    base_url = creds.base_url
    assert base_url.endswith("/v1/proxy/anthropic")
    client = anthropic.Anthropic(base_url=base_url, credentials=creds, max_retries=0)

    for expiry in range(4):
        # Within a token's life, calls share it.
        for _ in range(2):
            reply = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
            assert reply.content[0].text == "Hello from the fake."
        minted = tokens_of(bob.agent)
        assert len(minted) == expiry + 1
        assert minted[-1].ttl_seconds == 60
        used = TokenStore(bob.config).read()["anthropic 60s"]
        assert used.id == str(minted[-1].pk)
        # The token's end: past the provider's renewal point, and refused by the server.
        clock.skipped += 60
        end_for_real(minted[-1])
        assert refused(base_url, used.token) == 401

    client.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    assert len(tokens_of(bob.agent)) == 5
    # Only the real key went upstream, never a crd_ token.
    assert all(seen.headers.get("x-api-key") == bob.key for seen in fake_anthropic.requests)


def test_a_token_revoked_server_side_is_replaced_after_the_401(
    bob: Enrolled, fake_anthropic: FakeAnthropic
) -> None:
    creds = keybroker.Credentials("anthropic", ttl="15m", config=bob.config)
    client = anthropic.Anthropic(base_url=creds.base_url, credentials=creds)
    client.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    (first,) = tokens_of(bob.agent)

    # Still 15 minutes to go by every clock, but revoked: the proxy answers 401, the SDK asks
    # the provider with force_refresh, and the retry goes through with a new token.
    token_revoke(token=first)
    reply = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    assert reply.content[0].text == "Hello from the fake."
    first_again, second = tokens_of(bob.agent)
    assert first_again.revoked_at is not None
    assert second.revoked_at is None
    # The cache holds the new one, for the next process.
    assert TokenStore(bob.config).read()["anthropic 900s"].id == str(second.pk)


def test_after_a_401_a_token_another_process_renewed_is_taken_not_minted_again(
    bob: Enrolled,
) -> None:
    # Two providers on one config, as two processes are: each its own lock file handle.
    one = keybroker.Credentials("anthropic", ttl="10m", config=bob.config)
    other = keybroker.Credentials("anthropic", ttl="10m", config=bob.config)
    first = one()
    assert other().token == first.token
    token_revoke(token=tokens_of(bob.agent)[0])
    renewed = other(force_refresh=True)  # its call got the 401 first
    assert renewed.token != first.token
    assert one(force_refresh=True).token == renewed.token  # then this one's did
    assert len(tokens_of(bob.agent)) == 2


async def test_the_async_sdk_renews_and_recovers_from_a_401(bob: Enrolled) -> None:
    from asgiref.sync import sync_to_async

    clock = Clock()
    creds = keybroker.AsyncCredentials("anthropic", ttl="1m", config=bob.config, clock=clock)
    client = anthropic.AsyncAnthropic(
        base_url=await sync_to_async(lambda: creds.base_url)(), credentials=creds, max_retries=0
    )
    await client.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    (first,) = await sync_to_async(tokens_of)(bob.agent)
    clock.skipped += 60
    await sync_to_async(end_for_real)(first)
    await client.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    assert len(await sync_to_async(tokens_of)(bob.agent)) == 2

    retrying = anthropic.AsyncAnthropic(base_url=creds.base_url, credentials=creds)
    await retrying.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    second = (await sync_to_async(tokens_of)(bob.agent))[-1]
    await sync_to_async(token_revoke)(token=second)
    await retrying.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    assert len(await sync_to_async(tokens_of)(bob.agent)) == 3
    await client.close()
    await retrying.close()
    # The executor thread's connection would outlive the test database otherwise.
    await sync_to_async(connections.close_all)()


def test_a_token_is_served_until_its_renewal_point_and_replaced_after_it(bob: Enrolled) -> None:
    clock = Clock()
    creds = keybroker.Credentials("anthropic", ttl="1m", config=bob.config, clock=clock)
    first = creds()
    clock.skipped += 29  # 31 s left: more than the 30 s margin
    assert creds().token == first.token
    clock.skipped += 2  # 29 s left
    renewed = creds()
    assert renewed.token != first.token
    assert len(tokens_of(bob.agent)) == 2
    # The SDK is told the new token's real end: a minute from now.
    assert renewed.expires_at is not None
    assert 55 <= renewed.expires_at - time.time() <= 61


def test_the_renewal_point_is_thirty_seconds_or_a_fifth_of_the_ttl() -> None:
    assert renew_margin(60) == 30
    assert renew_margin(15 * 60) == 180
    assert renew_margin(3600) == 720
    assert renew_margin(40) == 20  # never more than half: a token is always used a while


def keybroker_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "keybroker.cli", "--config", str(config), *args]


def test_processes_asking_at_once_mint_one_token_and_share_it(bob: Enrolled) -> None:
    command = keybroker_command(bob.config, "get", "anthropic", "--cached", "--ttl", "5m")
    env = clean_env(HOME=str(bob.config.parent))
    running = [
        subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(5)
    ]
    printed = {process.communicate(timeout=60)[0].strip() for process in running}
    assert all(process.returncode == 0 for process in running)
    (token,) = tokens_of(bob.agent)
    assert len(printed) == 1
    assert printed.pop().startswith("crd_")
    cache = bob.config.parent / CACHE_FILE
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    assert json.loads(cache.read_text())["tokens"]["anthropic 300s"]["id"] == str(token.pk)


def test_get_cached_replaces_a_revoked_token_and_ignores_other_ttls(
    bob: Enrolled, capsys: pytest.CaptureFixture[str]
) -> None:
    def get(*extra: str) -> str:
        code = cli.main(["--config", str(bob.config), "get", "anthropic", "--cached", *extra])
        assert code == cli.EXIT_OK
        return capsys.readouterr().out.strip()

    first = get("--ttl", "10m")
    assert get("--ttl", "10m") == first
    assert get("--ttl", "600") == first  # the same TTL, written another way
    other = get("--ttl", "1m")
    assert other != first
    assert len(tokens_of(bob.agent)) == 2

    # Claude Code cannot say "that one was refused": the helper asks the server instead.
    token_revoke(token=tokens_of(bob.agent)[0])
    replaced = get("--ttl", "10m")
    assert replaced not in (first, other)
    as_json = json.loads(get("--ttl", "10m", "--json"))
    assert as_json["token"] == replaced
    assert as_json["ttl"] == 600


def test_an_unenrolled_agent_gets_a_clear_error_not_a_stale_token(
    bob: Enrolled, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = keybroker.Credentials("anthropic", ttl="1m", config=bob.config)
    creds()
    Agent.objects.filter(pk=bob.agent.pk).delete()
    with pytest.raises(keybroker.CredentialsError) as raised:
        creds(force_refresh=True)
    assert raised.value.code == cli.EXIT_NOT_ENROLLED
    assert "crd_" not in str(raised.value)


def test_claude_settings_prints_the_helper_and_writes_them_merged(
    bob: Enrolled,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--config", str(bob.config), "claude-settings", "--ttl", "15m"]) == 0
    printed = json.loads(capsys.readouterr().out)
    helper = printed["apiKeyHelper"]
    assert "get anthropic --cached --ttl 15m" in helper
    assert str(bob.config) in helper
    assert printed["env"]["ANTHROPIC_BASE_URL"].endswith("/v1/proxy/anthropic")
    # Claude Code asks again after 90 s: a cached 15-minute token is served until 3 minutes
    # before its end, so the key it holds always has 90 s left at least.
    assert printed["env"]["CLAUDE_CODE_API_KEY_HELPER_TTL_MS"] == "90000"

    # The helper, run as Claude Code runs it (a shell command), prints the cached token.
    shell = subprocess.run(
        ["/bin/sh", "-c", helper], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip().startswith("crd_")
    assert len(tokens_of(bob.agent)) == 1

    project = tmp_path / "project"
    (project / ".claude").mkdir(parents=True)
    (project / ".claude" / "settings.json").write_text(
        json.dumps({"model": "sonnet", "env": {"KEEP": "1"}})
    )
    monkeypatch.chdir(project)
    assert cli.main(["--config", str(bob.config), "claude-settings", "--write"]) == 0
    written = json.loads((project / ".claude" / "settings.json").read_text())
    assert written["model"] == "sonnet"
    assert written["env"]["KEEP"] == "1"
    assert written["apiKeyHelper"].endswith("get anthropic --cached")
    assert "ANTHROPIC_BASE_URL" in written["env"]


def test_importing_keybroker_does_not_import_the_sdk() -> None:
    code = "import keybroker, sys; keybroker.Credentials; print('anthropic' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=clean_env()
    )
    assert result.stdout.strip() == "False", result.stderr


def test_unenroll_deletes_the_token_cache_with_the_config(
    bob: Enrolled, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(bob.config), "get", "anthropic", "--cached"]) == 0
    cache = bob.config.parent / CACHE_FILE
    assert cache.exists()
    assert cli.main(["--config", str(bob.config), "unenroll"]) == 0
    assert not cache.exists()
    assert not bob.config.exists()
    assert not (bob.config.parent / "tokens.lock").exists()


def test_a_server_briefly_away_keeps_a_token_with_time_left_in_use(tmp_path: Path) -> None:
    """Renewing early fails (nothing listens on the server's port): the cached token is
    served while it has time left; once it has not, the failure is raised."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    config = tmp_path / "kb" / "config.json"
    cli.save_config(config, cli.Config(url=url, name="bob", agent_id="7", vend_token="ckr_x"))
    clock = Clock()
    cached = CachedToken(token="crd_cachedcached", id="1", backend="anthropic",
                         base_url=f"{url}/v1/proxy/anthropic", ttl=60,
                         expires=clock() + 20, agent_id="7", url=url)  # fmt: skip
    store = TokenStore(config, clock=clock)
    store.write({cache_key("anthropic", "1m"): cached})

    creds = keybroker.Credentials("anthropic", ttl="1m", config=config, clock=clock)
    assert creds().token == "crd_cachedcached"  # past its renewal point, 20 s left
    clock.skipped += 16  # 4 s left: too little to hand out
    with pytest.raises(keybroker.CredentialsError) as raised:
        creds()
    assert raised.value.code == cli.EXIT_UNREACHABLE
    assert f"cannot reach {url}" in str(raised.value)


def test_get_cached_without_a_config_says_not_enrolled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "config.json"
    assert cli.main(["--config", str(missing), "get", "anthropic", "--cached"]) == 6
    assert "not enrolled; run keybroker enroll" in capsys.readouterr().err
    assert not missing.parent.exists()
