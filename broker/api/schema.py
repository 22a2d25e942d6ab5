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
