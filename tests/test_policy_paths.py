"""Path globs are segment-aware (issue 19): ``*`` stays within a segment, ``**`` crosses
them, and patterns saved under the old fnmatch reading keep what they allowed."""

from __future__ import annotations

import importlib

import anthropic
import pytest
from django.apps import apps

from broker.infra.errors import ServiceError
from broker.models import Backend, Grant
from broker.services.policy import backend_policy_update, glob_check, path_allowed
from tests.fake_anthropic import FakeAnthropic
from tests.proxy_cast import Proxied
from tests.test_policy_proxy import HAIKU, HELLO, bobs_grant, sdk, set_policy

pytestmark = pytest.mark.django_db(transaction=True)

migration = importlib.import_module("broker.migrations.0007_segment_path_globs")


@pytest.mark.parametrize(
    ("path", "pattern", "allowed"),
    [
        ("/v1/messages", "/v1/messages*", True),
        ("/v1/messages/batches", "/v1/messages*", False),
        ("/v1/messages/count_tokens", "/v1/messages*", False),
        ("/v1/messages/batches", "/v1/messages**", True),
        ("/v1/messages", "/v1/messages**", True),
        ("/v1/messages", "/v1/messages/**", False),
        ("/v1/messages/batches/b1/results", "/v1/messages/**", True),
        ("/v1/messages/batches/b1/results", "/v1/messages/*", False),
        ("/v1/messages/batches/b1/results", "/v1/messages/batches/*/results", True),
        ("/v1/models/x", "/v1/models/[a-z]", True),
        ("/v1/models//", "/v1/models/[!a]", False),
        ("/v1/models/b", "/v1/models/[!a]", True),
        ("/v1/a.b", "/v1/a?b", True),
        ("/v1/a/b", "/v1/a?b", False),
        ("/v1/a/b", "/v1/a[!x]b", False),
        ("/v1/a/b", "/v1/a[+-0]b", False),  # a range around / still stops at it
        ("/v1/a.b", "/v1/a[+-0]b", True),
        ("/v1/a-b", "/v1/a[!-x]b", False),  # a leading - is a member, not a range
        ("/v1/a.b", "/v1/a[!-x]b", True),
        ("/v1/a~b", "/v1/a[~~]b", True),
        ("/v1/a!b", "/v1/a[a!]b", True),  # ! after the first place is a member
        ("/v1/messages/batches", "/v1/**/batches", True),
        ("/v1/a/b/c", "/v1/**", True),
        ("/v2/messages", "/v1/**", False),
        ("/v1/messages\n", "/v1/messages", False),
        ("/v1/messages", "/v1/Messages", False),
    ],
)
def test_star_stays_in_its_segment_and_double_star_crosses(
    path: str, pattern: str, allowed: bool
) -> None:
    assert path_allowed(path, [glob_check("paths", pattern)]) is allowed


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("/v1/***", r"has \*\*\*: use \* within one segment, \*\* across segments"),
        ("/v1/****", r"has \*\*\*"),
        ("/v1/a[/]b", r"has / in a \[\.\.\.\] class, which never matches /"),
        ("/v1/a[!x/]b", r"has / in a \[\.\.\.\] class"),
        ("/v1/[z-a]", r"has a \[\.\.\.\] class with a bad range"),
    ],
)
def test_malformed_path_globs_are_refused_with_the_rule(pattern: str, problem: str) -> None:
    with pytest.raises(ServiceError, match=problem):
        glob_check("paths", pattern)


def test_models_keep_fnmatch_globs() -> None:
    # A model id has no segments: *** is only a long way to write *.
    assert glob_check("models", "claude-***") == "claude-***"
    assert glob_check("models", "claude/[z-a]") == "claude/[z-a]"


def test_messages_star_allows_messages_but_not_batches_or_count_tokens(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    set_policy(paths=["/v1/messages*"])
    client = sdk(proxied)
    assert client.messages.create(model=HAIKU, max_tokens=8, messages=HELLO).usage
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        client.messages.count_tokens(model=HAIKU, messages=HELLO)
    assert "path /v1/messages/count_tokens is not allowed" in refused.value.message
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.batches.create(
            requests=[
                {
                    "custom_id": "a",
                    "params": {"model": HAIKU, "max_tokens": 8, "messages": HELLO},
                }
            ]
        )
    assert [r.path for r in fake_anthropic.requests] == ["/v1/messages"]


def test_the_migration_keeps_what_old_patterns_allowed_and_goes_back(
    proxied: Proxied, fake_anthropic: FakeAnthropic
) -> None:
    # Saved as they were before the migration ran (the services would not refuse them).
    Grant.objects.filter(pk=bobs_grant().pk).update(allowed_paths=["/v1/messages*", "/v1/m?dels"])
    backend = Backend.objects.get(name="anthropic")
    backend_policy_update(backend=backend, policy={"paths": ["/v1/*"]})

    migration.forwards(apps, None)
    assert bobs_grant().allowed_paths == ["/v1/messages**", "/v1/m?dels"]
    assert Backend.objects.get(name="anthropic").default_paths == ["/v1/**"]
    # What fnmatch allowed under the old pattern, the new one allows.
    client = sdk(proxied)
    client.messages.count_tokens(model=HAIKU, messages=HELLO)
    assert [r.path for r in fake_anthropic.requests] == ["/v1/messages/count_tokens"]

    migration.backwards(apps, None)
    assert bobs_grant().allowed_paths == ["/v1/messages*", "/v1/m?dels"]
    assert Backend.objects.get(name="anthropic").default_paths == ["/v1/*"]


def test_a_saved_pattern_with_a_reversed_range_matches_nothing() -> None:
    # Saved before glob_check refused it: no error at the proxy, and nothing allowed.
    assert path_allowed("/v1/models", ["/v1/[z-a]", "/v1/models"])
    assert not path_allowed("/v1/b", ["/v1/[z-a]"])
