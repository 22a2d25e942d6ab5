"""The model allow-list and the max_tokens cap cannot be sidestepped through another
endpoint (count_tokens, every request of a message batch) or through a body that two JSON
readers could read differently (repeated keys, escaped keys, other Unicode encodings).

What tests/test_policy_proxy.py and tests/test_policy_hostile.py already hold (a batch's
request naming another model or a bigger max_tokens, a repeated top-level model, JSON only
lenient parsers read, a gzipped body, a BOM, any Content-Type) is not repeated here.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from broker.models import Grant
from broker.services.policy import grant_update
from tests.fake_anthropic import FakeAnthropic
from tests.faults.figures import Figure, Figures
from tests.proxy_cast import Proxied, audit_drained

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

HAIKU = "claude-haiku-4-5"
OPUS = "claude-opus-4-1"
HELLO = [{"role": "user", "content": "Hello"}]
COUNT = "/v1/messages/count_tokens"
BATCHES = "/v1/messages/batches"


def batch(*params: str) -> str:
    """A batch body whose requests' params are these JSON texts, verbatim."""
    items = ", ".join(f'{{"custom_id": "r{n}", "params": {p}}}' for n, p in enumerate(params))
    return f'{{"requests": [{items}]}}'


FINE = json.dumps({"model": HAIKU, "max_tokens": 8, "messages": HELLO})
OPUS_FINE = FINE.replace(HAIKU, OPUS)

# (path, body, why it must be refused)
SIDESTEPS: list[tuple[str, bytes, str]] = [
    (COUNT, json.dumps({"model": OPUS, "messages": HELLO}).encode(), "models"),
    (COUNT, f'{{"model": "{HAIKU}", "model": "{OPUS}", "messages": []}}'.encode(), "repeated"),
    (COUNT, f'{{"mod\\u0065l": "{OPUS}", "messages": []}}'.encode(), "models"),
    (COUNT, json.dumps({"model": OPUS, "max_tokens": 4096, "messages": []}).encode(), "models"),
    (BATCHES, batch(FINE, f'{{"model": "{HAIKU}", "max_tokens": 8, "model": "{OPUS}"}}').encode(),
     "repeated"),
    (BATCHES, batch(FINE, f'{{"model": "{HAIKU}", "max_tokens": 8, "mod\\u0065l": "{OPUS}"}}')
     .encode(), "repeated"),
    (BATCHES, batch(FINE, f'{{"max_tokens": 8, "max_tokens": 4096, "model": "{HAIKU}"}}').encode(),
     "repeated"),
    (BATCHES, f'{{"requests": [{{"custom_id": "a", "params": {FINE}, "params": '
     f'{{"model": "{OPUS}", "max_tokens": 8}}}}]}}'.encode(), "repeated"),
    (BATCHES, (batch(FINE)[:-1] + ', "requests": ' + batch(OPUS_FINE)[13:]).encode(), "repeated"),
    (BATCHES, batch(FINE, f'{{"model": "{HAIKU}", "max_tokens": 4096.0}}').encode(), "max_tokens"),
    (BATCHES, batch(FINE, f'{{"model": "{HAIKU}", "max_tokens": 1e9}}').encode(), "max_tokens"),
    (BATCHES, batch(FINE, f'{{"model": "{HAIKU}", "max_tokens": true}}').encode(), "max_tokens"),
    (BATCHES, batch(FINE, f'{{"model": ["{HAIKU}"], "max_tokens": 8}}').encode(), "models"),
    (BATCHES, batch(OPUS_FINE).encode("utf-16"), "encoding"),
    (COUNT, json.dumps({"model": OPUS, "messages": []}).encode("utf-32"), "encoding"),
    (COUNT, json.dumps({"model": OPUS, "messages": []}).encode("utf-16-be"), "encoding"),
]  # fmt: skip


def set_policy(**changes: Any) -> None:
    grant_update(grant=Grant.objects.get(agent__name="bob"), policy=changes)


def post(proxied: Proxied, path: str, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{proxied.base_url}{path}",
        content=body,
        headers={"x-api-key": proxied.token, "content-type": "application/json"},
        timeout=10,
    )


@pytest.mark.parametrize(
    ("path", "body", "why"), SIDESTEPS, ids=[f"{p.rsplit('/')[-1]}-{w}" for p, _, w in SIDESTEPS]
)
def test_no_body_sidesteps_the_model_list_or_the_cap(
    proxied: Proxied, fake_anthropic: FakeAnthropic, path: str, body: bytes, why: str
) -> None:
    set_policy(models=["claude-haiku-*"], max_tokens=100)
    response = post(proxied, path, body)
    assert fake_anthropic.requests == []
    assert response.status_code in {400, 403}
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["message"].startswith(("policy models: ", "policy max_tokens: "))


def test_what_the_policy_allows_still_goes_through_those_endpoints(
    proxied: Proxied, fake_anthropic: FakeAnthropic, figures: Figures
) -> None:
    set_policy(models=["claude-haiku-*"], max_tokens=100)
    assert post(proxied, COUNT, json.dumps({"model": HAIKU, "messages": HELLO}).encode()).is_success
    assert post(proxied, BATCHES, batch(FINE, FINE).encode()).is_success
    assert [r.path for r in fake_anthropic.requests] == [COUNT, BATCHES]
    audit_drained()
    figures.add(
        Figure(
            case="Policy through count_tokens and batches; repeated keys, escapes, encodings",
            load=f"{len(SIDESTEPS) + len(MULTIPART_IN_NAME_ONLY)} hostile bodies, 2 allowed ones",
            faults="-",
            refused=f"{len(SIDESTEPS) + len(MULTIPART_IN_NAME_ONLY)} (400 or 403, naming the rule)",
            lost=0,
            holds="none reached the upstream; the allowed ones did",
        )
    )


MULTIPART_IN_NAME_ONLY = [
    b'{"model": "claude-opus-4-1", "max_tokens": 8, "messages": [],}',  # lenient JSON
    b"{'model': 'claude-opus-4-1', 'max_tokens': 8}",  # JSON5 or a Python literal
    b'{"model": "claude-opus-4-1"}\r\n--x\r\n\r\n--x--\r\n',  # as a preamble
]


@pytest.mark.parametrize(
    "body", MULTIPART_IN_NAME_ONLY, ids=["trailing-comma", "single-quotes", "preamble"]
)
def test_a_body_labelled_multipart_that_is_not_multipart_is_refused(
    proxied: Proxied, fake_anthropic: FakeAnthropic, body: bytes
) -> None:
    """Not JSON keybroker reads, but not multipart either: passing it on unchecked would let
    an upstream that reads it leniently see a model keybroker never saw."""
    set_policy(models=["claude-haiku-*"])
    response = httpx.post(
        f"{proxied.base_url}/v1/messages",
        content=body,
        headers={"x-api-key": proxied.token, "content-type": "multipart/form-data; boundary=x"},
        timeout=10,
    )
    assert (response.status_code, fake_anthropic.requests) == (400, [])
    assert (
        response.json()["error"]["message"] == "policy models: the request body is not valid JSON"
    )
