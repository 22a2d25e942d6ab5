"""keybroker's OIDC provider endpoints: discovery, JWKS and the token endpoint."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote

from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.parsers import FormParser, JSONParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from broker.api.auth import client_address
from broker.infra.errors import OAuthError
from broker.infra.ratelimit import RateLimited
from broker.services.oidc import oidc_discovery, oidc_jwks, oidc_token_issue


class PublicView(APIView):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]


class DiscoveryView(PublicView):
    @extend_schema(operation_id="oidc_discovery", responses=dict[str, Any])
    def get(self, request: Request) -> Response:
        return Response(oidc_discovery())


class JwksView(PublicView):
    @extend_schema(operation_id="oidc_jwks", responses=dict[str, Any])
    def get(self, request: Request) -> Response:
        response = Response(oidc_jwks())
        response["Cache-Control"] = "public, max-age=300"
        return response


class OAuthTokenInput(serializers.Serializer[Any]):
    grant_type = serializers.ChoiceField(choices=["client_credentials"])
    client_id = serializers.CharField(required=False)
    client_secret = serializers.CharField(required=False)
    audience = serializers.CharField(required=False)
    resource = serializers.CharField(required=False)


class OAuthTokenOutput(serializers.Serializer[Any]):
    access_token = serializers.CharField()
    token_type = serializers.CharField()
    expires_in = serializers.IntegerField()


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    """client_secret_basic (RFC 6749 2.3.1): both halves are form-urlencoded."""
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed Basic credentials", status_code=401) from None
    client_id, _, secret = decoded.partition(":")
    return unquote(client_id), unquote(secret)


def _text(data: Any, field: str) -> str:
    value = data.get(field, "")
    if not isinstance(value, str):
        raise OAuthError("invalid_request", f"{field} must be a string")
    return value


class TokenView(PublicView):
    parser_classes = [FormParser, JSONParser]

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, exceptions.ParseError | exceptions.UnsupportedMediaType):
            exc = OAuthError("invalid_request", str(exc.detail))
        if isinstance(exc, RateLimited):
            # RFC 6749's error shape, so that OAuth clients can read why; Retry-After says when.
            throttled = Response(
                {"error": "slow_down", "error_description": exc.message}, status=429
            )
            throttled["Retry-After"] = str(exc.retry_after)
            throttled["Cache-Control"] = "no-store"
            return throttled
        return super().handle_exception(exc)

    @extend_schema(
        operation_id="oauth_token",
        request=OAuthTokenInput,
        responses=OAuthTokenOutput,
        description="client_credentials grant (form or JSON; secret in the body or HTTP "
        "Basic). Errors follow RFC 6749: {error, error_description}.",
    )
    def post(self, request: Request) -> Response:
        data = request.data if hasattr(request.data, "get") else {}
        basic = _basic_credentials(request)
        client_id, client_secret = basic or (
            _text(data, "client_id"),
            _text(data, "client_secret"),
        )
        issued = oidc_token_issue(
            grant_type=_text(data, "grant_type"),
            client_id=client_id,
            client_secret=client_secret,
            audience=_text(data, "audience") or _text(data, "resource") or None,
            address=client_address(request),
        )
        response = Response(
            {"access_token": issued.jwt, "token_type": "Bearer", "expires_in": issued.expires_in}
        )
        response["Cache-Control"] = "no-store"
        return response
