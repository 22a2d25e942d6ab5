"""The JSON error shape of every API outside the proxy: {"error": {"type", "message"}}, with
``"fields": {"rpm": ["must be at least 1"], "ttl.min": [...]}`` added when the problems are
with named inputs (DRF's field-error shape), so a client can show each one by its input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.http import HttpRequest, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from broker.infra.errors import OAuthError, ServiceError
from broker.infra.ratelimit import RateLimited
from keybroker.wire import redact

_TYPES = {
    status.HTTP_400_BAD_REQUEST: "invalid_request",
    status.HTTP_401_UNAUTHORIZED: "authentication_error",
    status.HTTP_403_FORBIDDEN: "permission_denied",
    status.HTTP_404_NOT_FOUND: "not_found",
    status.HTTP_405_METHOD_NOT_ALLOWED: "method_not_allowed",
    status.HTTP_406_NOT_ACCEPTABLE: "not_acceptable",
    status.HTTP_409_CONFLICT: "conflict",
    status.HTTP_413_REQUEST_ENTITY_TOO_LARGE: "request_too_large",
    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE: "unsupported_media_type",
    status.HTTP_429_TOO_MANY_REQUESTS: "rate_limited",
}


def error_body(
    status_code: int,
    message: str,
    *,
    error_type: str | None = None,
    fields: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    # Messages may echo input; a credential pasted into the wrong field is never sent back.
    error: dict[str, Any] = {
        "type": error_type or _TYPES.get(status_code, "error"),
        "message": redact(message),
    }
    if fields:
        error["fields"] = {name: [redact(text) for text in texts] for name, texts in fields.items()}
    return {"error": error}


def _service_fields(exc: ServiceError) -> dict[str, list[str]]:
    return {field: texts for field, texts in exc.errors.items() if field is not None}


def _drf_fields(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested validation details by dotted input path (``ttl.min``, ``paths.0``)."""
    if isinstance(detail, dict):
        found: dict[str, list[str]] = {}
        for key, value in detail.items():
            path = prefix if key == "non_field_errors" else f"{prefix}{key}"
            for name, texts in _drf_fields(value, f"{path}." if path else "").items():
                found.setdefault(name, []).extend(texts)
        return found
    if isinstance(detail, list):
        merged: dict[str, list[str]] = {}
        for item in detail:
            for name, texts in _drf_fields(item, prefix).items():
                merged.setdefault(name, []).extend(texts)
        return merged
    name = prefix.rstrip(".")
    return {name: [str(detail)]} if name else {}


def _flatten(detail: Any, prefix: str = "") -> list[str]:
    """Turn DRF's nested validation details into readable 'field: message' lines."""
    if isinstance(detail, dict):
        lines: list[str] = []
        for key, value in detail.items():
            label = "" if key == "non_field_errors" else f"{prefix}{key}"
            lines.extend(_flatten(value, f"{label}." if label else ""))
        return lines
    if isinstance(detail, list):
        return [line for item in detail for line in _flatten(item, prefix)]
    text = str(detail)
    return [f"{prefix.rstrip('.')}: {text}" if prefix else text]


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, OAuthError):
        body = {"error": exc.error_type, "error_description": redact(exc.message)}
        oauth_refusal = Response(body, status=exc.status_code)
        oauth_refusal["Cache-Control"] = "no-store"
        return oauth_refusal
    if isinstance(exc, ServiceError):
        body = error_body(
            exc.status_code, exc.message, error_type=exc.error_type, fields=_service_fields(exc)
        )
        refusal = Response(body, status=exc.status_code)
        if isinstance(exc, RateLimited):
            refusal["Retry-After"] = str(exc.retry_after)
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            refusal["WWW-Authenticate"] = 'Bearer realm="keybroker"'
        return refusal
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.APIException):
        if isinstance(exc, exceptions.ValidationError):
            message = "; ".join(_flatten(exc.detail)) or "invalid request"
        else:
            message = "; ".join(_flatten(exc.detail))
        error_type = getattr(exc, "error_type", None)
        fields = _drf_fields(exc.detail) if isinstance(exc, exceptions.ValidationError) else {}
        if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
            # 401 needs a challenge; DRF only adds one when an authenticator declares it.
            response.status_code = status.HTTP_401_UNAUTHORIZED
            response["WWW-Authenticate"] = 'Bearer realm="keybroker"'
        response.data = error_body(
            response.status_code, message, error_type=error_type, fields=fields
        )
    return response


def json_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body(404, f"no such path: {request.path}"), status=404)


def json_server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse(error_body(500, "internal error; see the server log"), status=500)
