from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib.auth import get_permission_codename
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Model
from django.http import HttpRequest
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from broker.infra.errors import ServiceError
from broker.infra.ratelimit import LimiterUnavailable, RateLimited
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
        except (RateLimited, LimiterUnavailable):
            raise  # 429 with Retry-After (or 503), not a 401: the credential was not checked
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


# What each method asks of the view's model by default, as Django's admin does: reading needs
# view (or change, which implies it), creating add, changing change, removing delete.
METHOD_ACTIONS: dict[str, tuple[str, ...]] = {
    "GET": ("view",),
    "HEAD": ("view",),
    "OPTIONS": ("view",),
    "POST": ("add",),
    "PUT": ("change",),
    "PATCH": ("change",),
    "DELETE": ("delete",),
}


class AdminModelPermission(BasePermission):
    """Staff, holding the Django model permissions that the admin asks for the same thing.

    Each admin view names its model and the actions that differ from ``METHOD_ACTIONS``
    through :func:`admin_permissions`; a view that names none is refused (fail closed).
    Superusers hold every permission.
    """

    model: type[Model] | None = None
    actions: dict[str, tuple[str, ...]] = {}
    message = "the admin API is for staff users"

    def required(self, method: str) -> list[str]:
        if self.model is None:
            return []
        opts = self.model._meta
        actions = self.actions.get(method, METHOD_ACTIONS.get(method, ()))
        return [f"{opts.app_label}.{get_permission_codename(a, opts)}" for a in actions]

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return False
        required = self.required(request.method or "")
        if not required:
            self.message = f"{request.method} is not allowed here"
            return False
        missing = [perm for perm in required if not _user_may(user, perm)]
        if missing:
            self.message = f"you need the {' and '.join(missing)} permission" + (
                "s" if len(missing) > 1 else ""
            )
            return False
        return True


def _user_may(user: Any, perm: str) -> bool:
    """Django's has_perm; ``view_`` is also granted by ``change_``, as in the admin."""
    if user.has_perm(perm):
        return True
    app_label, _, codename = perm.partition(".")
    action, _, model = codename.partition("_")
    return action == "view" and bool(user.has_perm(f"{app_label}.change_{model}"))


def admin_permissions(
    model: type[Model], **actions: str | tuple[str, ...]
) -> list[type[BasePermission]]:
    """``permission_classes`` of an admin view over ``model``: ``post="change"`` for an action
    such as approve, ``post=("add", "change")`` where one request does both."""
    overrides = {
        method.upper(): (action,) if isinstance(action, str) else action
        for method, action in actions.items()
    }
    permission = type(
        f"Admin{model.__name__}Permission",
        (AdminModelPermission,),
        {"model": model, "actions": overrides},
    )
    return [permission]
