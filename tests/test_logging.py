from __future__ import annotations

import logging

import pytest

from broker.project.logging import RedactSecretsFilter

SECRETS = [
    "crd_" + "A1b2" * 10,
    "ckr_" + "Zz9_" * 10,
    "sk-ant-api03-" + "q" * 40,
    "sk-ant-oat01-" + "w" * 40,
    # An identity token or a federation assertion: a JWT is a bearer credential too.
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJiYWNrZW5kOndpZiJ9." + "s1g-_" * 17,
]


@pytest.mark.parametrize("secret", SECRETS)
def test_it_redacts_credentials_from_messages_and_tracebacks(secret: str) -> None:
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "token %s refused", (secret,), None)
    try:
        raise ValueError(f"bad {secret}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactSecretsFilter().filter(record)
    rendered = logging.Formatter().format(record)
    assert secret not in rendered
    assert "[redacted]" in rendered
    assert "token [redacted] refused" in rendered


def test_celerys_lines_about_the_heartbeat_go_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 20, item 5: three INFO lines every 10 s buried everything else serve prints."""
    import broker.project.celery  # noqa: F401  (installs the filter on Celery's loggers)

    trace = logging.getLogger("celery.app.trace")
    with caplog.at_level(logging.INFO):
        trace.info("Task %s[%s] succeeded in %ss: None", "broker.tasks.heartbeat", "1", 0.01)
        trace.info("Task %s[%s] succeeded in %ss: None", "broker.tasks.tokens_sweep", "2", 0.2)
        trace.error("Task %s[%s] raised unexpected: %r", "broker.tasks.heartbeat", "3", "boom")
    assert [(r.levelname, r.getMessage()[:40]) for r in caplog.records] == [
        ("INFO", "Task broker.tasks.tokens_sweep[2] succee"),
        ("ERROR", "Task broker.tasks.heartbeat[3] raised un"),
    ]
    caplog.clear()
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.DEBUG)  # KEYBROKER_LOG_LEVEL=DEBUG shows it again, as DEBUG
    try:
        with caplog.at_level(logging.DEBUG):
            trace.info("Task %s[%s] received", "broker.tasks.heartbeat", "4")
    finally:
        root.setLevel(before)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "Task broker.tasks.heartbeat[4] received")
    ]
