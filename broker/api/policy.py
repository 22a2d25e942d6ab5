"""Admin REST API for policy: a grant's own (``/v1/admin/agents/{id}/grants/{backend}``)
and a backend's defaults (``/v1/admin/backends/{name}/policy``).

Serializers check JSON types only; ranges, globs and TTL bounds are the service's, so the
CLI, the admin and this API refuse the same input with the same words.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from broker.api.auth import admin_permissions
from broker.api.serializers import StrictCharField, StrictInputSerializer
from broker.models import Backend, Grant
from broker.services.agents import agent_get_by_id, agent_ungrant
from broker.services.backends import backend_get
from broker.services.policy import (
    HOLD_TIMEOUT_DEFAULT,
    HOLD_TIMEOUT_MAX,
    HOLD_TIMEOUT_MIN,
    MAX_PATTERN_LENGTH,
    MAX_PATTERNS,
    backend_defaults,
    backend_policy_update,
    grant_describe,
    grant_get,
    grant_update,
    policy_values_json,
)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer; DRF's own also takes "60" and 60.0."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return int(data)


# An amount of dollars as JSON carries it: a decimal string ("25.00"), as the API gives
# them, or a number. Its range and places are the service's to check.
@extend_schema_field({"type": "string", "format": "decimal", "example": "25.00"})
class UsdAmountField(serializers.Field):  # type: ignore[type-arg]
    default_error_messages = {"invalid": 'give an amount in US dollars, such as "25.00"'}

    def to_internal_value(self, data: Any) -> str | int | float:
        if isinstance(data, bool) or not isinstance(data, str | int | float):
            self.fail("invalid")
        amount: str | int | float = data
        return amount

    def to_representation(self, value: Any) -> str:
        return str(value)


def _usd(text: str) -> UsdAmountField:
    return UsdAmountField(
        required=False,
        allow_null=True,
        help_text=f'{text}, such as "25.00" (to the millionth); null = the backend\'s default',
    )


def _patterns(what: str) -> serializers.ListField:
    return serializers.ListField(
        child=StrictCharField(max_length=MAX_PATTERN_LENGTH),
        max_length=MAX_PATTERNS,
        required=False,
        allow_null=True,
        help_text=f"glob patterns of allowed {what}; null or [] = the backend's default",
    )


def _limit(text: str) -> StrictIntegerField:
    return StrictIntegerField(
        required=False, allow_null=True, help_text=f"{text}; null = the backend's default"
    )


class HoldRuleSchema(serializers.Serializer[Any]):
    all = serializers.BooleanField(required=False, help_text="hold every call")
    models = serializers.ListField(
        child=serializers.CharField(), required=False, help_text="model globs (claude-opus-*)"
    )
    paths = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="upstream path globs: * within a segment, ** across",
    )
    max_tokens_above = serializers.IntegerField(
        required=False, allow_null=True, help_text="hold a call asking for more max_tokens"
    )
    timeout = serializers.IntegerField(
        required=False,
        help_text=f'seconds (or "2m" on input) a call waits for a person, '
        f"{HOLD_TIMEOUT_MIN} to {HOLD_TIMEOUT_MAX}; default {HOLD_TIMEOUT_DEFAULT}; then denied",
    )


# The service checks every key and value of a hold rule, so its refusals name them.
@extend_schema_field(HoldRuleSchema(allow_null=True))
class HoldRuleField(serializers.JSONField):
    pass


class BackendPolicyInput(StrictInputSerializer):
    """Fields left out stay as they are."""

    models = _patterns("models (claude-haiku-*)")
    paths = _patterns("upstream paths: * within a segment, ** across (/v1/messages/**)")
    rpm = _limit("requests per minute")
    tpm = _limit("input and output tokens per minute")
    daily_tokens = _limit("tokens per UTC day")
    daily_usd = _usd("USD per UTC day, from each call's cost")
    monthly_usd = _usd("USD per UTC calendar month, from each call's cost")
    max_tokens = _limit("cap on a request's max_tokens")
    max_concurrent = _limit("calls of this grant in flight at once, per proxy process")


class GrantPolicyInput(BackendPolicyInput):
    max_ttl = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text='longest token minted for this grant: seconds or "30m"; at most the '
        "backend's bound; null = the backend's bound",
    )
    hold = HoldRuleField(
        required=False,
        allow_null=True,
        help_text="calls that wait for a person's approval on the activity page; null = none",
    )


class PolicyValuesOutput(serializers.Serializer[Any]):
    models = serializers.ListField(child=serializers.CharField(), allow_null=True)
    paths = serializers.ListField(child=serializers.CharField(), allow_null=True)
    rpm = serializers.IntegerField(allow_null=True)
    tpm = serializers.IntegerField(allow_null=True)
    daily_tokens = serializers.IntegerField(allow_null=True)
    daily_usd = serializers.CharField(allow_null=True, help_text='USD, such as "25.00"')
    monthly_usd = serializers.CharField(allow_null=True, help_text='USD, such as "25.00"')
    max_tokens = serializers.IntegerField(allow_null=True)
    max_concurrent = serializers.IntegerField(allow_null=True)
    max_ttl = serializers.IntegerField(allow_null=True, help_text="seconds")
    hold = HoldRuleSchema(allow_null=True, required=False, help_text="null = no call is held")


class GrantPolicyOutput(serializers.Serializer[Any]):
    agent = serializers.CharField()
    backend = serializers.CharField()
    policy = PolicyValuesOutput(help_text="the grant's own values; null = the backend's default")
    defaults = PolicyValuesOutput(help_text="the backend's; max_ttl is its token TTL bound")
    effective = PolicyValuesOutput(help_text="what the proxy enforces; [] and null = no limit")
    sources = serializers.DictField(
        child=serializers.CharField(allow_null=True),
        help_text="where each effective value comes from: grant, backend, or null (no limit)",
    )


class BackendPolicyOutput(serializers.Serializer[Any]):
    backend = serializers.CharField()
    defaults = PolicyValuesOutput(help_text="null = no limit; max_ttl is the token TTL bound")


def _backend_body(name: str) -> dict[str, Any]:
    backend = backend_get(name=name)
    return {
        "backend": backend.name,
        "defaults": policy_values_json(
            {**backend_defaults(backend), "max_ttl": backend.token_ttl_max}
        ),
    }


class GrantPolicyView(APIView):
    permission_classes = admin_permissions(Grant)

    @extend_schema(operation_id="admin_grant_policy_inspect", responses=GrantPolicyOutput)
    def get(self, request: Request, agent_id: str, backend: str) -> Response:
        grant = grant_get(agent=agent_get_by_id(agent_id=agent_id), backend_name=backend)
        return Response(GrantPolicyOutput(grant_describe(grant)).data)

    @extend_schema(
        operation_id="admin_grant_policy_update",
        request=GrantPolicyInput,
        responses=GrantPolicyOutput,
        description="Change a grant's policy; fields left out stay, null takes the backend's "
        "default. Bad input is a 400 naming every problem, and nothing is saved.",
    )
    def patch(self, request: Request, agent_id: str, backend: str) -> Response:
        grant = grant_get(agent=agent_get_by_id(agent_id=agent_id), backend_name=backend)
        data = GrantPolicyInput(data=request.data)
        data.is_valid(raise_exception=True)
        grant = grant_update(grant=grant, policy=data.validated_data, by=request.user)
        return Response(GrantPolicyOutput(grant_describe(grant)).data)

    @extend_schema(
        operation_id="admin_grant_remove",
        responses={204: OpenApiResponse(description="removed; the agent's tokens for it revoked")},
    )
    def delete(self, request: Request, agent_id: str, backend: str) -> Response:
        agent_ungrant(
            agent=agent_get_by_id(agent_id=agent_id),
            backend=backend_get(name=backend),
            by=request.user,
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class BackendPolicyView(APIView):
    permission_classes = admin_permissions(Backend)

    @extend_schema(operation_id="admin_backend_policy_inspect", responses=BackendPolicyOutput)
    def get(self, request: Request, name: str) -> Response:
        return Response(BackendPolicyOutput(_backend_body(name)).data)

    @extend_schema(
        operation_id="admin_backend_policy_update",
        request=BackendPolicyInput,
        responses=BackendPolicyOutput,
        description="Policy defaults for every grant on this backend; a grant's own value "
        "wins. Fields left out stay; null removes the default.",
    )
    def patch(self, request: Request, name: str) -> Response:
        data = BackendPolicyInput(data=request.data)
        data.is_valid(raise_exception=True)
        backend_policy_update(
            backend=backend_get(name=name), policy=data.validated_data, by=request.user
        )
        return Response(BackendPolicyOutput(_backend_body(name)).data)
