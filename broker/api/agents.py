"""The agent API: enrollment, status, scopes, credentials, tokens, unenrollment."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from broker.api.auth import AgentAuthentication, IsAgent, client_address
from broker.api.policy import HoldRuleSchema
from broker.api.serializers import StrictCharField, StrictInputSerializer
from broker.infra.ratelimit import rate_limit_hit
from broker.models import Agent, Grant, Token
from broker.selectors.policy import policy_left
from broker.services.access import agent_rejection, agent_require_approved
from broker.services.agents import agent_enroll, agent_request_scopes, agent_scopes, agent_unenroll
from broker.services.oidc import oidc_client_create, oidc_discovery
from broker.services.policy import grant_policy, grants_of
from broker.services.throttles import enrollment_rate
from broker.services.tokens import (
    sdk_base_url,
    token_get,
    token_issue,
    token_revoke,
    tokens_live,
    ttl_bounds,
)


class EnrollInput(StrictInputSerializer):
    # Lengths here only stop a flood; the rules and their words are agent_enroll's.
    name = StrictCharField(max_length=255, trim_whitespace=False)
    scopes = serializers.ListField(
        child=StrictCharField(max_length=63), allow_empty=False, max_length=32
    )
    description = StrictCharField(max_length=5000, required=False, allow_blank=True)


class ScopesInput(StrictInputSerializer):
    scopes = serializers.ListField(
        child=StrictCharField(max_length=63), allow_empty=False, max_length=32
    )


class CredentialsInput(StrictInputSerializer):
    ttl = serializers.JSONField(
        required=False, help_text='seconds, or a duration such as "90s", "30m", "1h"'
    )


class RejectionOutput(serializers.Serializer[Any]):
    declined = serializers.ListField(
        child=serializers.CharField(), help_text="the backends the admin declined"
    )
    reason = serializers.CharField(help_text="the admin's reason; empty when none was given")


class EnrollmentOutput(serializers.ModelSerializer[Agent]):
    scopes = serializers.SerializerMethodField(help_text="backends the agent holds a grant for")
    requested_scopes = serializers.ListField(
        child=serializers.CharField(), help_text="backends it asked for, awaiting an admin"
    )
    rejection = serializers.SerializerMethodField(
        help_text="when the admin's last decision was a refusal (the enrollment rejected, or "
        "more scopes declined): what was declined and why; else null"
    )

    class Meta:
        model = Agent
        fields = ["id", "name", "status", "scopes", "requested_scopes", "rejection"]

    def get_scopes(self, agent: Agent) -> list[str]:
        return agent_scopes(agent)

    @extend_schema_field(RejectionOutput(allow_null=True))
    def get_rejection(self, agent: Agent) -> dict[str, Any] | None:
        if agent.is_waiting:
            return None  # a new request waits: the old refusal is not the news
        rejection = agent_rejection(agent)
        return rejection._asdict() if rejection is not None else None


class EnrolledOutput(EnrollmentOutput):
    vend_token = serializers.CharField(help_text="shown once; send as Authorization: Bearer")

    class Meta(EnrollmentOutput.Meta):
        fields = [*EnrollmentOutput.Meta.fields, "vend_token"]


class TtlBoundsOutput(serializers.Serializer[Any]):
    min = serializers.IntegerField()
    default = serializers.IntegerField()
    max = serializers.IntegerField()


class LimitLeftOutput(serializers.Serializer[Any]):
    limit = serializers.IntegerField()
    used = serializers.IntegerField(allow_null=True, help_text="null when it cannot be read")
    remaining = serializers.IntegerField(allow_null=True)
    resets_in = serializers.IntegerField(
        allow_null=True, help_text="seconds until some of it comes back"
    )


class UsdLeftOutput(serializers.Serializer[Any]):
    limit = serializers.CharField(help_text='USD, such as "25.00"')
    used = serializers.CharField(allow_null=True, help_text="null when it cannot be read")
    remaining = serializers.CharField(allow_null=True)
    resets_in = serializers.IntegerField(allow_null=True, help_text="seconds until it renews")


class GrantLimitsOutput(serializers.Serializer[Any]):
    models = serializers.ListField(
        child=serializers.CharField(), help_text="allowed model globs; [] = any"
    )
    paths = serializers.ListField(
        child=serializers.CharField(),
        help_text="allowed upstream path globs (* within a segment, ** across); [] = any",
    )
    max_tokens = serializers.IntegerField(allow_null=True, help_text="cap on max_tokens")
    max_concurrent = serializers.IntegerField(
        allow_null=True, help_text="calls in flight at once, per proxy process; null = no limit"
    )
    rpm = LimitLeftOutput(allow_null=True, help_text="requests in any sliding window")
    tpm = LimitLeftOutput(allow_null=True, help_text="tokens in the current window")
    daily_tokens = LimitLeftOutput(allow_null=True, help_text="tokens today (UTC)")
    daily_usd = UsdLeftOutput(allow_null=True, help_text="USD spent today (UTC)")
    monthly_usd = UsdLeftOutput(allow_null=True, help_text="USD spent this UTC calendar month")
    window_seconds = serializers.IntegerField(help_text="the rpm and tpm window")
    hold = HoldRuleSchema(
        allow_null=True,
        help_text="calls that wait for a person's approval (up to timeout seconds, then 403); "
        "null = none",
    )


class GrantOutput(serializers.Serializer[Any]):
    backend = serializers.CharField()
    kind = serializers.CharField(help_text="the backend's provider: anthropic, openai, …")
    base_url = serializers.CharField(help_text="hand this to the SDK as its base_url")
    ttl = TtlBoundsOutput(help_text="seconds; the grant's max_ttl lowers the backend's")
    limits = GrantLimitsOutput()


def grant_status(grant: Grant) -> dict[str, Any]:
    """A grant as its agent sees it: where to call, its TTLs, its limits and what is left."""
    backend = grant.backend
    policy = grant_policy(grant)
    low, default, high = ttl_bounds(backend=backend, max_ttl=policy.max_ttl)
    return {
        "backend": backend.name,
        "kind": backend.kind,
        "base_url": sdk_base_url(backend),
        "ttl": {"min": low, "default": default, "max": high},
        "limits": {
            "models": list(policy.models),
            "paths": list(policy.paths),
            "max_tokens": policy.max_tokens,
            "max_concurrent": policy.max_concurrent,
            "hold": policy.hold.json() if policy.hold is not None else None,
            **policy_left(policy),
        },
    }


class StatusOutput(EnrollmentOutput):
    grants = serializers.SerializerMethodField()

    class Meta(EnrollmentOutput.Meta):
        fields = [*EnrollmentOutput.Meta.fields, "grants"]

    @extend_schema_field(GrantOutput(many=True))
    def get_grants(self, agent: Agent) -> list[dict[str, Any]]:
        return [grant_status(grant) for grant in grants_of(agent)]


class IssuedTokenOutput(serializers.Serializer[Any]):
    id = serializers.UUIDField()
    token = serializers.CharField(help_text="shown once")
    backend = serializers.CharField()
    kind = serializers.CharField(help_text="the backend's provider: anthropic, openai, …")
    expires_at = serializers.DateTimeField()
    ttl = serializers.IntegerField(help_text="seconds")
    base_url = serializers.CharField(help_text="hand this to the SDK as its base_url")


class ActiveTokenOutput(serializers.ModelSerializer[Token]):
    backend = serializers.CharField(source="backend.name")
    prefix = serializers.CharField(source="display_prefix")

    class Meta:
        model = Token
        fields = ["id", "backend", "prefix", "created_at", "expires_at", "last_used_at"]


class ClientOutput(serializers.Serializer[Any]):
    client_id = serializers.CharField()
    client_secret = serializers.CharField(help_text="shown once")
    token_endpoint = serializers.CharField()


class AgentView(APIView):
    authentication_classes = [AgentAuthentication]
    permission_classes = [IsAgent]

    def agent(self, request: Request) -> Agent:
        assert isinstance(request.auth, Agent)
        return request.auth


class EnrollView(APIView):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="agent_enroll",
        request=EnrollInput,
        responses={201: EnrolledOutput},
        description="Enroll a new agent; it stays pending until an admin approves it. "
        "Rate limited per client address.",
    )
    def post(self, request: Request) -> Response:
        address = client_address(request)
        rate_limit_hit(scope="enroll", key=address or "-", rate=enrollment_rate(), what="enroll")
        data = EnrollInput(data=request.data)
        data.is_valid(raise_exception=True)
        enrolled = agent_enroll(
            name=data.validated_data["name"],
            scopes=data.validated_data["scopes"],
            description=data.validated_data.get("description", ""),
            address=address,
        )
        body = {**EnrollmentOutput(enrolled.agent).data, "vend_token": enrolled.vend_token}
        return Response(body, status=status.HTTP_201_CREATED)


class EnrollStatusView(AgentView):
    @extend_schema(operation_id="agent_enroll_status", responses=EnrollmentOutput)
    def get(self, request: Request) -> Response:
        return Response(EnrollmentOutput(self.agent(request)).data)


class StatusView(AgentView):
    @extend_schema(operation_id="agent_status", responses=StatusOutput)
    def get(self, request: Request) -> Response:
        agent = self.agent(request)
        agent_require_approved(agent)
        return Response(StatusOutput(agent).data)


class RequestScopesView(AgentView):
    @extend_schema(
        operation_id="agent_request_scopes",
        request=ScopesInput,
        responses={202: StatusOutput},
        description="Ask for more backends; they wait for an admin's approval.",
    )
    def post(self, request: Request) -> Response:
        agent = self.agent(request)
        agent_require_approved(agent)
        data = ScopesInput(data=request.data)
        data.is_valid(raise_exception=True)
        agent = agent_request_scopes(agent=agent, scopes=data.validated_data["scopes"])
        return Response(StatusOutput(agent).data, status=status.HTTP_202_ACCEPTED)


class CredentialsView(AgentView):
    @extend_schema(
        operation_id="agent_credentials",
        request=CredentialsInput,
        responses={201: IssuedTokenOutput},
        description="Mint a crd_ token for one backend. Without a ttl the backend's default "
        "applies; outside its bounds the answer is 400 naming them.",
    )
    def post(self, request: Request, backend: str) -> Response:
        data = CredentialsInput(data=request.data)
        data.is_valid(raise_exception=True)
        issued = token_issue(
            agent=self.agent(request),
            backend_name=backend,
            ttl=data.validated_data.get("ttl"),
            address=client_address(request),
        )
        body = {
            "id": issued.token.id,
            "token": issued.plaintext,
            "backend": issued.token.backend.name,
            "kind": issued.token.backend.kind,
            "expires_at": issued.token.expires_at,
            "ttl": issued.token.ttl_seconds,
            "base_url": issued.base_url,
        }
        return Response(IssuedTokenOutput(body).data, status=status.HTTP_201_CREATED)


class ActiveView(AgentView):
    @extend_schema(operation_id="agent_tokens_list", responses=ActiveTokenOutput(many=True))
    def get(self, request: Request) -> Response:
        return Response(ActiveTokenOutput(tokens_live(agent=self.agent(request)), many=True).data)


class ActiveDetailView(AgentView):
    @extend_schema(
        operation_id="agent_tokens_revoke",
        responses={204: OpenApiResponse(description="revoked")},
    )
    def delete(self, request: Request, token_id: str) -> Response:
        agent = self.agent(request)
        token_revoke(token=token_get(token_id=token_id, agent=agent), agent=agent)
        return Response(status=status.HTTP_204_NO_CONTENT)


class SelfView(AgentView):
    @extend_schema(
        operation_id="agent_unenroll",
        responses={204: OpenApiResponse(description="unenrolled")},
        description="Unenroll: the agent and every token it holds stop working at once.",
    )
    def delete(self, request: Request) -> Response:
        agent_unenroll(agent=self.agent(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ClientsView(AgentView):
    @extend_schema(
        operation_id="agent_oidc_client_create",
        request=None,
        responses={201: ClientOutput},
        description="OAuth client credentials for POST /oauth/token (client_credentials).",
    )
    def post(self, request: Request) -> Response:
        issued = oidc_client_create(agent=self.agent(request), address=client_address(request))
        body = {
            "client_id": issued.client.client_id,
            "client_secret": issued.client_secret,
            "token_endpoint": oidc_discovery()["token_endpoint"],
        }
        return Response(ClientOutput(body).data, status=status.HTTP_201_CREATED)
