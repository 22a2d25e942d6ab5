"""Hostile input through the REST API: schemathesis makes requests for every operation of
keybroker's OpenAPI schema, schema-valid and not, and sends them to a live server with the
credential each operation asks for. No answer may be a 5xx, every answer must be one the
schema documents (status, content type, headers, body), schema-violating input must be
refused with a 4xx, an operation that needs a credential must refuse a request without one,
and no answer may carry a secret.

Half the requests to an operation with path parameters name objects that exist (the backend,
its key, an approved and a pending agent, a token, an identity grant), so changes are
attempted on real rows and not only refused as unknown."""

from __future__ import annotations

import json
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from django.contrib.auth.models import AbstractBaseUser
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from audit.channels import channel_create
from broker.runtime.health import worker_heartbeat_record
from broker.services.admin_tokens import admintoken_create
from broker.services.agents import agent_enroll
from broker.services.backends import backend_add
from broker.services.identity import identity_grant
from broker.services.tokens import token_issue
from tests.fake_anthropic import FakeAnthropic
from tests.faults.figures import Figure, Figures
from tests.keys import api_key

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

EXAMPLES = 4  # fuzzed per operation, after the coverage phase: the 47 take about a minute


def openapi_spec() -> dict[str, Any]:
    """The schema /api/schema/ serves (test_the_server_serves_the_schema_fuzzed_here)."""
    generated = SchemaGenerator().get_schema(request=None, public=True)
    return dict(json.loads(OpenApiJsonRenderer().render(generated)))


def fuzzed_paths(spec: dict[str, Any]) -> dict[str, Any]:
    """Every path but the proxy's: its entry documents a passthrough (any answer is the
    upstream's), and its hostile input has tests of its own (test_policy_hostile,
    test_slow_clients, test_proxy_wire)."""
    return {p: ops for p, ops in spec["paths"].items() if not p.startswith("/v1/proxy/")}


schema = schemathesis.openapi.from_dict({**openapi_spec(), "paths": fuzzed_paths(openapi_spec())})
# Every phase: examples, the coverage phase's boundary cases (each parameter missing, empty,
# too long, of the wrong type, past its bounds: what found the audit API's page_size and
# cursor bugs), and EXAMPLES fuzzed requests. The methods an operation does not have are
# left out: Django answers them all alike, 405.
schema.config.phases.coverage.unexpected_methods = set()
# Answers by status class, over the run, for docs/reliability.md's figures.
ANSWERS: Counter[str] = Counter()


@dataclass
class Cast:
    """What the requests authenticate with, and the objects their path parameters may name."""

    admin: str
    agent: str
    objects: dict[str, list[str]]
    secrets: list[str]


@pytest.fixture
def cast(alice: AbstractBaseUser, fake_anthropic: FakeAnthropic, settings: Any) -> Cast:
    # The throttles hold in tests/test_auth_throttle.py; here they would answer every
    # request after the first few refused credentials with 429.
    settings.AUTH_FAILURE_RATE = settings.AUTH_CLIENT_FAILURE_RATE = "100000/5m"
    settings.ENROLL_RATE = "100000/5m"
    worker_heartbeat_record()  # as a live worker does, so that /ready answers 200
    key = api_key(tail="Hs7i")
    backend = backend_add(name="anthropic", secret=key, base_url=fake_anthropic.url)
    bob = agent_enroll(name="bob", scopes=["anthropic"], approved_by=alice)
    carol = agent_enroll(name="carol", scopes=["anthropic"])
    token = token_issue(agent=bob.agent, backend_name="anthropic")
    grant = identity_grant(agent=bob.agent, audience="https://api.anthropic.com", by=alice)
    admin = admintoken_create(name="schemathesis", username="alice").plaintext
    channel = channel_create(
        kind="webhook", url="https://hooks.example.com/fuzz", events=["spike"], by=alice
    )
    return Cast(
        admin=admin,
        agent=bob.vend_token,
        objects={
            "agent_id": [str(bob.agent.pk), str(carol.agent.pk)],
            "backend": ["anthropic"],
            "name": ["anthropic"],
            "fingerprint": [k.fingerprint for k in backend.keys.all()],
            "token_id": [str(token.token.pk)],
            "grant_id": [str(grant.pk)],
            "channel_id": [str(channel.channel.pk)],
            # No call is held here: a well-formed id that names none (a 404).
            "held_id": ["hld_0000000000000000"],
        },
        secrets=[admin, key, bob.vend_token, carol.vend_token, token.plaintext],
    )


def credential_for(case: schemathesis.Case, cast: Cast, alice: AbstractBaseUser) -> str | None:
    """The admin token, or bob's vend token, or for an unenrollment (which would leave the
    next request without an agent) the vend token of an agent approved for it alone; None
    for public operations."""
    security = case.operation.definition.raw.get("security") or [{}]
    schemes = {name for requirement in security for name in requirement}
    if "adminToken" in schemes:
        return cast.admin
    if "agentCredential" not in schemes:
        return None
    if case.operation.definition.raw.get("operationId") != "agent_unenroll":
        return cast.agent
    agent = agent_enroll(
        name=f"fuzz-{uuid.uuid4().hex[:12]}", scopes=["anthropic"], approved_by=alice
    )
    cast.secrets.append(agent.vend_token)
    return agent.vend_token


def name_real_objects(case: schemathesis.Case, cast: Cast) -> None:
    """Half the cases with valid path parameters get existing objects in their place, chosen
    by a hash of what was generated, so that a failing case replays as it ran."""
    named = case.path_parameters or {}
    negative_path = case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH)
    if not named or negative_path:
        return
    digest = zlib.crc32(json.dumps(named, sort_keys=True, default=str).encode())
    if digest % 2:
        return
    for shift, name in enumerate(sorted(named), start=1):
        choices = cast.objects[name]
        named[name] = choices[(digest >> shift) % len(choices)]


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_5xx_or_outside_its_schema(
    case: schemathesis.Case, cast: Cast, alice: AbstractBaseUser, live_url: str
) -> None:
    credential = credential_for(case, cast, alice)
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    name_real_objects(case, cast)
    # Schema-valid is not always acceptable: no schema says "the name of a backend that
    # exists" or "min <= default <= max", so positive_data_acceptance would fail on honest
    # 400s. Every other check runs, not_a_server_error and the conformance checks among them.
    response = case.call_and_validate(
        base_url=live_url, headers=headers, excluded_checks=[positive_data_acceptance]
    )
    ANSWERS[f"{response.status_code // 100}xx"] += 1
    echoed = [secret[:12] for secret in cast.secrets if secret in response.text]
    assert echoed == [], f"{case.operation.label} answered with a secret"


def test_the_server_serves_the_schema_fuzzed_here(
    live_url: str, transactional_db: None, figures: Figures
) -> None:
    served = httpx.get(
        f"{live_url}/api/schema/", headers={"Accept": "application/vnd.oai.openapi+json"}
    )
    assert served.status_code == 200
    assert served.json() == openapi_spec()
    operations = [op for path in fuzzed_paths(served.json()).values() for op in path]
    assert len(list(schema.get_all_operations())) == len(operations)
    figures.add(
        Figure(
            case="Hostile input: schemathesis against the OpenAPI schema",
            load=f"{len(operations)} operations, {sum(ANSWERS.values())} generated requests "
            "(boundary cases and fuzzing, valid and invalid), 2 credentials",
            faults="schema-violating bodies, queries, paths and headers; missing credentials",
            refused=f"{ANSWERS['4xx']} (4xx, each as documented)",
            lost=0,
            holds=f"{ANSWERS['5xx']} 5xx; every answer as its schema says; no secret echoed",
        )
    )
