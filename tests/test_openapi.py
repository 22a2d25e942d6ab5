from __future__ import annotations

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


def test_schema_is_openapi_3_and_lists_the_public_paths(client: Client) -> None:
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert {"/health", "/ready"} <= set(schema["paths"])


def test_schema_documents_every_api_path_and_builds_without_warnings() -> None:
    from django.core.management import call_command

    # drf-spectacular's own validation; a warning means a component is wrong or ambiguous.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", "/dev/null")
    schema = Client().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    paths = set(schema["paths"])
    expected = {
        "/v1/enroll", "/v1/enroll/status", "/v1/status", "/v1/request",
        "/v1/credentials/{backend}", "/v1/active", "/v1/active/{token_id}", "/v1/self",
        "/v1/clients", "/oauth/token", "/.well-known/openid-configuration",
        "/.well-known/jwks.json", "/v1/admin/backends/", "/v1/admin/agents/",
        "/v1/admin/agents/{agent_id}", "/v1/admin/pending/", "/v1/admin/tokens/",
        "/v1/admin/pending/{agent_id}/approve", "/v1/admin/tokens/{token_id}",
        "/v1/admin/agents/{agent_id}/identities",
        "/v1/admin/agents/{agent_id}/identities/{grant_id}",
    }  # fmt: skip
    assert expected <= paths, expected - paths
    schemes = schema["components"]["securitySchemes"]
    assert {"adminToken", "agentCredential"} <= set(schemes)
    credentials = schema["paths"]["/v1/credentials/{backend}"]["post"]
    assert credentials["security"] == [{"agentCredential": []}]
    assert "201" in credentials["responses"]


def test_docs_viewer_is_served(client: Client) -> None:
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_operations_are_tagged_by_who_they_are_for_and_the_proxy_is_documented(
    client: Client,
) -> None:
    """A new operator opening /api/docs/ finds the agent API, the admin API by family, OIDC,
    health and the proxy apart, not 38 operations under "v1" (issue 20, item 7)."""
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    tags = {
        path: {tag for operation in operations.values() for tag in operation["tags"]}
        for path, operations in schema["paths"].items()
    }
    assert tags["/v1/credentials/{backend}"] == {"agent"}
    assert tags["/v1/enroll"] == {"agent"}
    assert tags["/v1/admin/backends/{name}/keys"] == {"admin: backends"}
    assert tags["/v1/admin/pending/{agent_id}/approve"] == {"admin: agents"}
    assert tags["/v1/admin/tokens/"] == {"admin: tokens"}
    assert tags["/v1/admin/audit/export.csv"] == {"admin: audit"}
    assert tags["/oauth/token"] == tags["/.well-known/jwks.json"] == {"oidc"}
    assert tags["/health"] == tags["/ready"] == {"health"}
    # Every tag used is declared, with its description, and none is left untagged.
    declared = [tag["name"] for tag in schema["tags"]]
    assert set().union(*tags.values()) == set(declared)
    assert all(tag["description"] for tag in schema["tags"])

    proxy = schema["paths"]["/v1/proxy/{backend}/{path}"]
    assert set(proxy) == {"get", "post", "put", "patch", "delete"}
    post = proxy["post"]
    assert post["security"] == [{"proxyToken": []}, {"proxyBearer": []}]
    schemes = schema["components"]["securitySchemes"]
    assert (schemes["proxyToken"]["in"], schemes["proxyToken"]["name"]) == ("header", "x-api-key")
    assert schemes["proxyBearer"]["scheme"] == "bearer"
    assert "passed through unchanged" in post["responses"]["default"]["description"]
    assert post["responses"]["403"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ProxyError"
    }
    assert {"401", "403", "404", "429", "502", "503", "504"} <= set(post["responses"])
    assert "x-api-key" in post["description"]
