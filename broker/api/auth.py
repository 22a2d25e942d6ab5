from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from broker.services.admin_tokens import PREFIX, admintoken_authenticate


class AdminTokenAuthentication(BaseAuthentication):
    """``Authorization: Bearer cka_…``: an admin API token acting as its staff user."""

    def authenticate(self, request: Request) -> tuple[AbstractBaseUser, None] | None:
        parts = get_authorization_header(request).split()
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            return None
        try:
            token = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("invalid token") from None
        if not token.startswith(f"{PREFIX}_"):
            return None  # some other kind of bearer token; another authenticator may know it
        user = admintoken_authenticate(token)
        if user is None:
            raise exceptions.AuthenticationFailed("invalid or revoked admin token")
        return user, None

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="keybroker"'


class AdminTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = AdminTokenAuthentication
    name = "adminToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An admin API token (cka_…) from `manage.py admintoken create`.",
        }
