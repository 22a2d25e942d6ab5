"""agent/keybroker/wire.py: what the CLI and the server agree on, written once."""

from __future__ import annotations

import pytest

from keybroker.wire import (
    duration_format,
    duration_parse,
    is_loopback_host,
    is_proxy_path,
    proxy_base_url,
    redact,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), (" 2H ", 7200), ("0", 0)],
)
def test_whole_durations_in_seconds(text: str, seconds: int) -> None:
    assert duration_parse(text) == seconds


@pytest.mark.parametrize("text", ["-5m", "abc", "1.5", "true", "[]", "7d", "", "5 m", "1e3"])
def test_what_is_not_a_whole_duration_is_refused_saying_what_is(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration; use seconds or 90s, 30m, 2h"):
        duration_parse(text)


def test_fractions_and_days_only_where_asked_for() -> None:
    assert duration_parse("1.5", whole=False) == 1.5
    assert duration_parse("7d", units="smhd", unit_required=True) == 7 * 86_400
    with pytest.raises(ValueError, match="use 90s, 30m, 2h, 7d"):
        duration_parse("90", units="smhd", unit_required=True)


@pytest.mark.parametrize(
    ("seconds", "text"), [(3600, "1h"), (600, "10m"), (90, "90s"), (1.5, "1.5s"), (0, "0s")]
)
def test_durations_are_written_the_shortest_way(seconds: float, text: str) -> None:
    assert duration_format(seconds) == text
    assert duration_parse(text, whole=False) == seconds


def test_the_proxy_url_of_a_backend() -> None:
    assert proxy_base_url("https://kb.example/", "anthropic") == (
        "https://kb.example/v1/proxy/anthropic"
    )
    assert is_proxy_path("/v1/proxy/anthropic/v1/messages")
    assert not is_proxy_path("/v1/proxyx/anthropic")


def test_redaction_cuts_every_credential_and_can_keep_its_kind() -> None:
    text = "crd_abcdefghijkl sk-ant-api03-abcdefghijk eyJhbGciOiJIUzI1.eyJzdWIiOiIx.sig ok"
    assert redact(text) == "[redacted] [redacted] [redacted] ok"
    assert redact(text, keep_kind=True) == "crd_… sk-ant-… eyJ… ok"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("127.0.0.1", True), ("::1", True), ("10.0.0.1", False), ("kb", False)],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
