"""Two hosts, one PostgreSQL and one Redis, as the production topology runs keybroker: what
one host is told is what the other does at once. A token revoked through host A's admin API
is refused at host B on the next request; an rpm limit set through host B holds for the
calls of both hosts together, under concurrent load.

Each host is a network namespace of its own (tests/faults/netns.py) running `serve`'s
uvicorn command; PostgreSQL, Redis (both private to this case: tests/faults/processes.py)
and the fake upstream listen on the root namespace's address on the bridge between them.
Nothing leaves the machine. Skipped, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import clean_env, free_port
from tests.fake_anthropic import FakeAnthropic, serve_in_thread
from tests.faults.cast import ANSWER_BOUND_SECONDS, MESSAGE, call
from tests.faults.figures import Figure, Figures
from tests.faults.netns import Network, two_hosts
from tests.faults.processes import PrivatePostgres, PrivateRedis, WebProcess, manage, web_process
from tests.keys import api_key
from tests.waiting import wait_until

pytestmark = [pytest.mark.faults]

RPM = 20
CALLS_PER_HOST = 30  # 3 times RPM in all: most must be refused
THREADS_PER_HOST = 12
CALLS = "from audit_auditevent where action in ('proxy.request', 'policy.denied')"

# Run once, in the shared database, from the root namespace: the cast, and what the test
# needs of it as JSON on the last line.
SETUP = """
import json, os
from django.contrib.auth import get_user_model
from broker.models import Backend
from broker.services.admin_tokens import admintoken_create
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.tokens import token_issue
key, url = json.loads(os.environ["TWO_HOSTS_SETUP"])
alice = get_user_model().objects.create_superuser("alice", password="alice-pw-123")
backend_add(name="anthropic", secret=key, base_url="http://127.0.0.1")
# The upstream is on the bridge, where keybroker takes only https; it is the fake.
Backend.objects.filter(name="anthropic").update(base_url=url)
cast = {"admin": admintoken_create(name="two hosts", username="alice").plaintext}
for name in ("revoked-via-a", "revoked-via-b", "limited"):
    agent = agent_enroll(name=name, scopes=["anthropic"], approved_by=alice).agent
    issued = token_issue(agent=agent, backend_name="anthropic", ttl="30m")
    cast[name] = {"agent": str(agent.pk), "id": str(issued.token.pk), "token": issued.plaintext}
print(json.dumps(cast))
"""


@dataclass
class Cluster:
    a: WebProcess
    b: WebProcess
    network: Network
    postgres: PrivatePostgres
    upstream: FakeAnthropic
    cast: dict[str, Any]

    def admin(self, web: WebProcess, method: str, path: str, **json_body: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{web.url}{path}",
            headers={"authorization": f"Bearer {self.cast['admin']}"},
            json=json_body or None,
            timeout=ANSWER_BOUND_SECONDS,
        )

    def audited(self, agent: str) -> int:
        return int(self.postgres.query(f"select count(*) {CALLS} and agent = '{agent}'"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with ExitStack() as stack:
        network = stack.enter_context(two_hosts())
        postgres = PrivatePostgres(also_on=network.gateway, clients=network.subnet)
        stack.callback(postgres.close)
        redis = PrivateRedis(tcp_host=network.gateway)
        stack.callback(redis.close)
        redis.start()
        upstream = FakeAnthropic()
        port = free_port()
        server = serve_in_thread(upstream, port, host=network.gateway)
        stack.callback(lambda: setattr(server, "should_exit", True))
        upstream.url = f"http://{network.gateway}:{port}"
        key = api_key(tail="2Hst")
        upstream.valid_keys.add(key)

        # What every machine of a deployment shares (README, Production topology).
        shared = {
            "KEYBROKER_SECRET_KEY": secrets.token_urlsafe(48),
            "KEYBROKER_ENCRYPTION_KEY": secrets.token_urlsafe(48),
        }
        setup_env = clean_env(
            DATABASE_URL=postgres.url,
            REDIS_URL=redis.url,
            KEYBROKER_DATA_DIR=str(tmp_path_factory.mktemp("setup")),
            TWO_HOSTS_SETUP=json.dumps([key, upstream.url]),
            **shared,
        )
        manage(setup_env, "migrate", "--noinput")
        cast = json.loads(manage(setup_env, "shell", "-c", SETUP).splitlines()[-1])

        webs = []
        for host in network.hosts:
            env = clean_env(
                DATABASE_URL=postgres.url_on(network.gateway),
                REDIS_URL=redis.tcp_url,
                KEYBROKER_DATA_DIR=str(tmp_path_factory.mktemp(host.namespace)),
                KEYBROKER_HOST=host.address,
                **shared,
            )
            webs.append(
                stack.enter_context(web_process(env, host=host.address, prefix=host.prefix))
            )
        yield Cluster(webs[0], webs[1], network, postgres, upstream, cast)


def test_a_token_revoked_through_one_host_is_refused_at_the_other_on_the_next_request(
    cluster: Cluster, figures: Figures
) -> None:
    a, b = cluster.a, cluster.b
    sent = 0
    refused = []
    for revoker, other, name in [(a, b, "revoked-via-a"), (b, a, "revoked-via-b")]:
        token = cluster.cast[name]
        # Both hosts have the token in their caches: twice each, the second from memory.
        warm = [call(web.url, token["token"], "warm") for web in (other, revoker) * 2]
        assert [w.status for w in warm] == [200] * 4, warm
        revoked = cluster.admin(revoker, "DELETE", f"/v1/admin/tokens/{token['id']}")
        assert revoked.status_code == 204, revoked.text
        after = [call(web.url, token["token"], "after") for web in (other, revoker)]
        assert [(x.status, x.message) for x in after] == [(401, "token revoked")] * 2
        sent += len(warm) + len(after)
        refused += after

    def audited() -> int:
        return cluster.audited("revoked-via-a") + cluster.audited("revoked-via-b")

    wait_until(
        lambda: audited() >= sent, timeout=20, what=lambda: f"{sent} audit events ({audited()})"
    )
    audited_calls = audited()
    assert audited_calls == sent
    figures.add(
        Figure(
            case="Two hosts (network namespaces), one PostgreSQL and one Redis: a token "
            "revoked through one host",
            load=f"{sent} calls, 1 web process on each host",
            faults="2 tokens cached on both hosts; each revoked through one host's admin API",
            refused=f"{len(refused)}: the next call at each host (401 token revoked)",
            lost=sent - audited_calls,
            holds="refused at the other host on the very next request",
        )
    )


@dataclass
class Limited:
    host: str
    status: int  # 0: no answer
    error_type: str
    message: str
    retry_after: str | None


def limited_call(web: WebProcess, host: str, token: str) -> Limited:
    try:
        response = httpx.post(
            f"{web.url}/v1/proxy/anthropic/v1/messages",
            json=MESSAGE,
            headers={"x-api-key": token},
            timeout=ANSWER_BOUND_SECONDS + 5,
        )
    except httpx.HTTPError as exc:
        return Limited(host, 0, type(exc).__name__, "", None)
    if response.status_code == 200:
        return Limited(host, 200, "", "", None)
    body = response.json()
    assert body["type"] == "error", body  # Anthropic's error shape, which SDKs read
    return Limited(
        host,
        response.status_code,
        body["error"]["type"],
        body["error"]["message"],
        response.headers.get("retry-after"),
    )


def test_an_rpm_limit_holds_across_both_hosts_under_concurrent_load(
    cluster: Cluster, figures: Figures
) -> None:
    a, b = cluster.a, cluster.b
    limited = cluster.cast["limited"]
    # Both hosts hold the token and its grant, still without a limit, in their caches.
    warm = [call(web.url, limited["token"], "warm") for web in (a, b, a, b)]
    assert [w.status for w in warm] == [200] * 4, warm
    # The limit is set through host B: host A learns of it by the next request too.
    changed = cluster.admin(
        b, "PATCH", f"/v1/admin/agents/{limited['agent']}/grants/anthropic", rpm=RPM
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["effective"]["rpm"] == RPM
    upstream_before = len(cluster.upstream.requests)

    with ThreadPoolExecutor(max_workers=2 * THREADS_PER_HOST) as pool:
        futures = [
            pool.submit(limited_call, web, name, limited["token"])
            for _ in range(CALLS_PER_HOST)
            for web, name in ((a, "A"), (b, "B"))
        ]
        answers = [future.result() for future in futures]

    through = [x for x in answers if x.status == 200]
    refused = [x for x in answers if x.status != 200]
    # At most RPM in all (and all RPM of them, every call being inside one window): the
    # counter is the shared Redis's, not each host's.
    assert len(through) == RPM, [(x.host, x.status, x.message) for x in answers]
    assert len(cluster.upstream.requests) - upstream_before == RPM
    who = "agent limited on anthropic"
    assert {(x.status, x.error_type) for x in refused} == {(429, "rate_limit_error")}
    assert {x.message.split("; retry in")[0] for x in refused} == {
        f"policy rpm: {RPM} requests per minute used up for {who}"
    }
    assert all(x.retry_after is not None and 0 < int(x.retry_after) <= 60 for x in refused)
    assert {x.host for x in refused} == {"A", "B"}  # both hosts refused some

    sent = len(warm) + len(answers)
    wait_until(
        lambda: cluster.audited("limited") >= sent,
        timeout=20,
        what=lambda: f"{sent} audit events of the limited agent ({cluster.audited('limited')})",
    )
    audited = cluster.audited("limited")
    assert audited == sent
    denied = cluster.postgres.query(
        f"select count(*) {CALLS} and agent = 'limited' and action = 'policy.denied'"
    )
    assert int(denied) == len(refused)
    figures.add(
        Figure(
            case="Two hosts (network namespaces), one PostgreSQL and one Redis: an rpm limit "
            "under concurrent load",
            load=f"{len(answers)} calls at once, {CALLS_PER_HOST} through each host, "
            f"{2 * THREADS_PER_HOST} clients",
            faults=f"rpm {RPM} set through host B after both hosts cached the grant",
            refused=f"{len(refused)} (429 rate_limit_error, retry-after), at both hosts",
            lost=sent - audited,
            holds=f"{len(through)} of {len(answers)} through in all (the limit is {RPM}); "
            f"the upstream saw {RPM}",
        )
    )
