"""PostgreSQL restarted under load: calls that need the database fail clearly while it is
down, the web process recovers by itself once it is back (no restart of keybroker), and
every call's audit event is in the trail afterwards, none lost and none twice.

The PostgreSQL restarted here is a private cluster (tests/faults/processes.py): the
machine's is shared with other runs and must never be stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from audit.recorder import SPILL_FILE
from tests.conftest import clean_env
from tests.fake_anthropic import FakeAnthropic
from tests.faults.cast import ANSWER_BOUND_SECONDS, Answer, call
from tests.faults.figures import Figure, Figures
from tests.faults.processes import PrivatePostgres, WebProcess, manage, web_process
from tests.keys import api_key
from tests.waiting import wait_until

pytestmark = [pytest.mark.faults]

TICK_SECONDS = 0.2
OUTAGE_TICKS = 15  # 3 s down
CALM_TICKS = 10
CALLS = "from audit_auditevent where action in ('proxy.request', 'policy.denied')"
COUNT_CALLS = f"select count(*) {CALLS}"
# The upstream's request-id of each call: one event each; the 503 has none ('' counts once).
COUNT_REQUEST_IDS = f"select count(distinct request_id) {CALLS}"

# Run in the private database: the cast of the case, and the two tokens' plaintexts.
SETUP = """
import sys
from django.contrib.auth import get_user_model
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.tokens import token_issue
key, url = sys.argv[1:3]
alice = get_user_model().objects.create_superuser("alice", password="alice-pw-123")
backend_add(name="anthropic", secret=key, base_url=url)
for name in ("steady", "first-seen-while-down"):
    agent = agent_enroll(name=name, scopes=["anthropic"], approved_by=alice).agent
    print(token_issue(agent=agent, backend_name="anthropic", ttl="30m").plaintext)
"""


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    postgres = PrivatePostgres()
    try:
        yield postgres
    finally:
        postgres.close()


def test_postgres_restarted_under_load(
    private_postgres: PrivatePostgres,
    fake_anthropic: FakeAnthropic,
    figures: Figures,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path  # the web processes' own: their spill file is this case's alone
    env = clean_env(
        DATABASE_URL=private_postgres.url,
        REDIS_URL=settings.REDIS_URL,
        KEYBROKER_REDIS_PREFIX=f"{settings.REDIS_KEY_PREFIX}-pg",
        KEYBROKER_DATA_DIR=str(data_dir),
    )
    manage(env, "migrate", "--noinput")
    key = api_key(tail="P0st")
    fake_anthropic.valid_keys.add(key)
    printed = manage(
        env, "shell", "-c", SETUP.replace("sys.argv[1:3]", repr([key, fake_anthropic.url]))
    )
    steady, unseen = printed.split()[-2:]

    answers: list[Answer] = []

    def run(web: WebProcess, ticks: int) -> None:
        next_tick = time.monotonic()
        for _ in range(ticks):
            answers.append(call(web.url, steady, "steady"))
            next_tick += TICK_SECONDS
            time.sleep(max(0.0, next_tick - time.monotonic()))  # the load's pace

    def audited() -> int:
        return int(private_postgres.query(COUNT_CALLS))

    with web_process(env) as web:
        run(web, CALM_TICKS)
        private_postgres.stop()
        run(web, OUTAGE_TICKS // 2)
        while_down = call(web.url, unseen, "first-seen-while-down")
        run(web, OUTAGE_TICKS - OUTAGE_TICKS // 2)
        private_postgres.start()
        run(web, CALM_TICKS)
        after = call(web.url, unseen, "first-seen-after")
        first_window = len(answers) + 2
        wait_until(
            lambda: audited() >= first_window,
            timeout=20,
            what=lambda: f"{first_window} audit events ({audited()})",
        )
        # Down again, and the web process stopped while its events cannot be written.
        private_postgres.stop()
        run(web, CALM_TICKS)
    spill = data_dir / SPILL_FILE
    spilled = len(spill.read_text().splitlines())
    private_postgres.start()
    with web_process(env) as web:
        run(web, 1)  # its first event starts the recorder, which replays the spill file
        sent = len(answers) + 2
        wait_until(
            lambda: audited() >= sent, timeout=20, what=lambda: f"{sent} events ({audited()})"
        )

    # Calls whose token was cached went on while the database was down; one it had to read
    # got a clear 503, and once the database was back, the same token went through.
    assert {a.status for a in answers} == {200}
    assert max(a.seconds for a in [*answers, while_down, after]) < ANSWER_BOUND_SECONDS
    assert (while_down.status, while_down.message[:40]) == (
        503, "keybroker cannot check this token right "
    )  # fmt: skip
    assert after.status == 200
    # Every call's event is in the trail once: those held in memory through the outage, and
    # those the stopped process spilled to disk, replayed by the next one.
    assert spilled == CALM_TICKS
    assert not spill.exists()
    assert audited() == sent
    assert private_postgres.query(COUNT_REQUEST_IDS) == str(sent)
    figures.add(
        Figure(
            case="PostgreSQL stopped and started under load, twice",
            load=f"{sent} calls, 1 web process, then another",
            faults=f"PostgreSQL down {OUTAGE_TICKS * TICK_SECONDS:.0f} s; then down while the "
            "web process stops",
            refused="1: a token first seen while down (503); cached tokens all 200",
            lost=sent - audited(),
            holds=f"recovers without a restart; {spilled} events spilled at shutdown, replayed "
            "by the next process; none twice",
        )
    )
