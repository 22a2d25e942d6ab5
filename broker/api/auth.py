from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib.auth.models import AbstractBaseUser
from django.http import HttpRequest
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from broker.errors import ServiceError
from broker.models import Agent
from broker.services.admin_tokens import PREFIX, admintoken_authenticate
from broker.services.agents import agent_authenticate

if TYPE_CHECKING:
    # rest_framework.views imports this module through its settings.
    from rest_framework.views import APIView


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


class AgentPrincipal:
    """``request.user`` for an agent: authenticated, but never staff."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False
    is_active = True

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def get_username(self) -> str:
        return self.agent.name


def client_address(request: Request | HttpRequest) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


class AgentAuthentication(BaseAuthentication):
    """``Authorization: Bearer ckr_…`` (vend token) or ``Bearer <JWT>`` from /oauth/token."""

    def authenticate(self, request: Request) -> tuple[AgentPrincipal, Agent] | None:
        parts = get_authorization_header(request).split()
        if not parts:
            raise exceptions.NotAuthenticated(
                "no agent credential: send Authorization: Bearer ckr_… (or a JWT)"
            )
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            raise exceptions.AuthenticationFailed(
                "send the agent credential as Authorization: Bearer ckr_… (or a JWT)"
            )
        try:
            credential = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("invalid agent credential") from None
        try:
            agent = agent_authenticate(credential, address=client_address(request))
        except ServiceError as exc:
            raise exceptions.AuthenticationFailed(exc.message) from None
        return AgentPrincipal(agent), agent

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="keybroker"'


class AgentScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = AgentAuthentication
    name = "agentCredential"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The agent's vend token (ckr_…) or a JWT from POST /oauth/token.",
        }


class IsAgent(BasePermission):
    message = "send the agent credential as Authorization: Bearer ckr_…"

    def has_permission(self, request: Request, view: APIView) -> bool:
        return isinstance(request.auth, Agent)
