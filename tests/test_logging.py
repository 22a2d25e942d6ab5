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
