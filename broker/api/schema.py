"""The refusals in the OpenAPI schema. drf-spectacular documents what each view answers when
all goes well; the refusals come from one exception handler (broker/api/errors.py), in one
shape for every operation, so this hook documents them from what each operation takes: a
body or a query can be bad (400), a credential missing or not enough (401, 403), a path
parameter unknown (404), a throttled credential or enrollment refused (429, or 503 while the
limiter cannot count)."""

from __future__ import annotations

from typing import Any

from rest_framework import status

ERROR = "Error"
OAUTH_ERROR = "OAuthError"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every refusal outside the proxy and /oauth/token.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "type": {"type": "string", "example": "invalid_request"},
                "message": {"type": "string"},
                "fields": {
                    "type": "object",
                    "description": "What was wrong with each named input.",
                    "additionalProperties": {"type": "array", "items": {"type": "string"}},
                },
            },
            "required": ["type", "message"],
        }
    },
    "required": ["error"],
}
OAUTH_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 6749's error answer.",
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
    "required": ["error"],
}

WHY = {
    status.HTTP_400_BAD_REQUEST: "bad input; `fields` names each input that was wrong",
    status.HTTP_401_UNAUTHORIZED: "no credential, or one that is unknown, expired or revoked",
    status.HTTP_403_FORBIDDEN: "the credential is good but may not do this",
    status.HTTP_404_NOT_FOUND: "nothing by that name or id",
    status.HTTP_409_CONFLICT: "the current state does not allow it",
    status.HTTP_429_TOO_MANY_REQUESTS: "throttled; `Retry-After` says for how long",
    status.HTTP_503_SERVICE_UNAVAILABLE: "the throttle cannot count (Redis is unreachable)",
}

# Operations whose service refuses some changes for the state things are in (a name that
# exists, an agent already decided, a key already in the pool, a backend still in use).
CONFLICTS = {
    "agent_enroll",
    "admin_agents_create",
    "admin_pending_approve",
    "admin_pending_reject",
    "admin_backends_create",
    "admin_backends_remove",
    "admin_backends_rotate",
    "admin_backend_keys_add",
    "admin_backend_keys_update",
    "admin_backend_keys_remove",
}
# Public operations behind a throttle of their own.
THROTTLED = {"agent_enroll", "oauth_token"}
# Public operations that check a credential sent in the request (client_secret).
AUTHENTICATING = {"oauth_token"}


def _refusals(operation: dict[str, Any]) -> set[int]:
    schemes = {name for requirement in operation.get("security", []) for name in requirement}
    parameters = {parameter["in"] for parameter in operation.get("parameters", [])}
    found: set[int] = set()
    if "requestBody" in operation or "query" in parameters:
        found.add(status.HTTP_400_BAD_REQUEST)
    if schemes:
        found |= {status.HTTP_401_UNAUTHORIZED, status.HTTP_403_FORBIDDEN}
    if operation["operationId"] in AUTHENTICATING:
        found.add(status.HTTP_401_UNAUTHORIZED)
    if "path" in parameters:
        found.add(status.HTTP_404_NOT_FOUND)
    if operation["operationId"] in CONFLICTS:
        found.add(status.HTTP_409_CONFLICT)
    if "agentCredential" in schemes or operation["operationId"] in THROTTLED:
        found |= {status.HTTP_429_TOO_MANY_REQUESTS, status.HTTP_503_SERVICE_UNAVAILABLE}
    return found


def document_refusals(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """drf-spectacular's postprocessing hook: each operation's refusals, in their shape."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas[ERROR], schemas[OAUTH_ERROR] = ERROR_SCHEMA, OAUTH_ERROR_SCHEMA
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            shape = OAUTH_ERROR if operation["operationId"] == "oauth_token" else ERROR
            responses = operation.setdefault("responses", {})
            for code in sorted(_refusals(operation)):
                responses.setdefault(
                    str(code),
                    {
                        "description": WHY[code],
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{shape}"}
                            }
                        },
                    },
                )
    return result


# Who each path is for, so the docs list agent, admin, OIDC, health and proxy operations
# apart instead of 38 under one "v1" (issue 20, item 7). First match wins.
AUDIENCES: tuple[tuple[str, str], ...] = (
    ("/v1/admin/backends/", "admin: backends"),
    ("/v1/admin/agents/", "admin: agents"),
    ("/v1/admin/pending/", "admin: agents"),
    ("/v1/admin/held/", "admin: agents"),
    ("/v1/admin/tokens/", "admin: tokens"),
    ("/v1/admin/audit/", "admin: audit"),
    ("/v1/admin/usage/", "admin: usage and monitoring"),
    ("/metrics", "admin: usage and monitoring"),
    ("/v1/admin/notifications/", "admin: alerts"),
    ("/v1/proxy/", "proxy"),
    ("/v1/", "agent"),
    ("/.well-known/", "oidc"),
    ("/oauth/", "oidc"),
    ("/health", "health"),
    ("/ready", "health"),
)
TAGS: list[dict[str, str]] = [
    {
        "name": "agent",
        "description": "For agents: enroll, read their status and limits, mint crd_ tokens. "
        "Authenticated by the vend token (ckr_…) or a JWT from /oauth/token.",
    },
    {
        "name": "proxy",
        "description": "For agents' SDKs: the upstream API through keybroker, with a crd_ token.",
    },
    {"name": "oidc", "description": "keybroker as an OIDC issuer: discovery, keys, tokens."},
    {"name": "admin: backends", "description": "Upstream credentials, key pools and defaults."},
    {"name": "admin: agents", "description": "Approvals, agents, grants and their policy."},
    {"name": "admin: tokens", "description": "crd_ tokens: list, inspect, revoke."},
    {"name": "admin: audit", "description": "The audit trail and its exports."},
    {
        "name": "admin: usage and monitoring",
        "description": "Calls, tokens and cost per agent, backend and model; Prometheus metrics.",
    },
    {"name": "admin: alerts", "description": "Where alerts go, and each delivery's fate."},
    {"name": "health", "description": "Liveness and readiness, for load balancers."},
]

PROXY_ERROR = "ProxyError"
PROXY_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "keybroker's own refusals at the proxy, in Anthropic's error shape (an "
    'OpenAI backend\'s in OpenAI\'s: {"error": {"message", "type", "code"}}), so the SDKs '
    "raise their usual exceptions. docs/errors.md has every condition.",
    "properties": {
        "type": {"type": "string", "example": "error"},
        "error": {
            "type": "object",
            "properties": {
                "type": {"type": "string", "example": "permission_error"},
                "message": {"type": "string"},
            },
            "required": ["type", "message"],
        },
    },
    "required": ["type", "error"],
}
PROXY_REFUSALS = {
    "401": "no crd_ token, or one unknown, expired or revoked (a vend token or an upstream "
    "key sent instead is told what to send)",
    "403": "the agent is not approved, has no grant for the backend, the backend is "
    "disabled, or a policy rule refuses the call (naming it)",
    "404": "no backend of that name for this token",
    "413": "the body is over KEYBROKER_PROXY_MAX_BODY",
    "429": "a rate or budget of the grant is used up; `retry-after` says when to retry",
    "502": "the upstream could not be reached",
    "503": "every key of the backend was found invalid (`x-should-retry: false`), or "
    "keybroker cannot count a limit now",
    "504": "the upstream did not answer in time",
}
PROXY_DESCRIPTION = (
    "Any method and any path under the backend's base URL: `{path}` is the upstream's path "
    "(`v1/messages`, `v1/chat/completions`, `v1/models`, …) and may hold slashes. The "
    "crd_ token from `POST /v1/credentials/{backend}` goes in `x-api-key` or "
    "`Authorization: Bearer`; keybroker swaps it for the backend's real key and forwards "
    "the request as sent (other headers, query string and body), then the upstream's "
    "answer as it came (status, headers such as `request-id` and `retry-after`, JSON or a "
    "stream of server-sent events chunk by chunk). Point an SDK's base URL at "
    "`{public_url}/v1/proxy/{backend}` (the credential's `base_url`). Only keybroker's own "
    "refusals are listed here; every other answer is the upstream's."
)


def _proxy_operation(method: str) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{PROXY_ERROR}"}}}
    operation: dict[str, Any] = {
        "operationId": f"proxy_{method}",
        "summary": "Call the upstream API through keybroker",
        "description": PROXY_DESCRIPTION,
        "tags": ["proxy"],
        "parameters": [
            {
                "name": "backend",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "the backend's name, as the credential names it",
            },
            {
                "name": "path",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "the upstream path, slashes included (v1/messages)",
            },
        ],
        "security": [{"proxyToken": []}, {"proxyBearer": []}],
        "responses": {
            "default": {"description": "the upstream's answer, passed through unchanged"},
            **{
                code: {"description": why, "content": error} for code, why in PROXY_REFUSALS.items()
            },
        },
    }
    if method in {"post", "put", "patch"}:
        operation["requestBody"] = {
            "description": "passed to the upstream as sent (at most KEYBROKER_PROXY_MAX_BODY)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    return operation


def tag_by_audience(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """drf-spectacular's postprocessing hook: each operation tagged by who it is for, and
    the proxy, which is not a DRF view, documented beside them."""
    paths = result.setdefault("paths", {})
    paths["/v1/proxy/{backend}/{path}"] = {
        method: _proxy_operation(method) for method in ("get", "post", "put", "patch", "delete")
    }
    for path, operations in paths.items():
        tag = next((name for prefix, name in AUDIENCES if path.startswith(prefix)), None)
        for operation in operations.values():
            if tag is not None:
                operation["tags"] = [tag]
    components = result.setdefault("components", {})
    components.setdefault("schemas", {})[PROXY_ERROR] = PROXY_ERROR_SCHEMA
    components.setdefault("securitySchemes", {}).update(
        {
            "proxyToken": {
                "type": "apiKey",
                "in": "header",
                "name": "x-api-key",
                "description": "a crd_ token (as the Anthropic SDKs send their key)",
            },
            "proxyBearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "a crd_ token (as the OpenAI SDKs and Claude Code send it)",
            },
        }
    )
    result["tags"] = TAGS
    return result
