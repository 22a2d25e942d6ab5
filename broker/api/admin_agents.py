"""Admin REST API for agents, approvals and tokens: /v1/admin/agents|pending|tokens/."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from broker.api.agents import EnrollInput, EnrollmentOutput
from broker.api.auth import admin_permissions
from broker.api.policy import GrantPolicyInput
from broker.api.serializers import StrictCharField, StrictInputSerializer
from broker.infra.errors import ServiceError
from broker.models import Agent, AgentStatus, Grant, IdentityGrant, Token, TokenState
from broker.selectors.agents import agents_waiting
from broker.selectors.tokens import tokens_list
from broker.services.agents import (
    agent_approve,
    agent_enroll,
    agent_get_by_id,
    agent_reject,
    agent_unenroll,
)
from broker.services.backends import backend_get
from broker.services.identity import (
    identity_grant,
    identity_grant_get,
    identity_grants_of,
    identity_revoke,
)
from broker.services.policy import grant_set
from broker.services.tokens import token_get, token_revoke


class AgentOutput(EnrollmentOutput):
    decided_by = serializers.SerializerMethodField()

    class Meta(EnrollmentOutput.Meta):
        fields = [
            *EnrollmentOutput.Meta.fields, "description", "created_at", "decided_at",
            "decided_by", "last_seen_at", "enrolled_from",
        ]  # fmt: skip

    def get_decided_by(self, agent: Agent) -> str | None:
        return agent.decided_by.get_username() if agent.decided_by else None


class CreatedAgentOutput(AgentOutput):
    vend_token = serializers.CharField(help_text="shown once")

    class Meta(AgentOutput.Meta):
        fields = [*AgentOutput.Meta.fields, "vend_token"]


class TokenRecordOutput(serializers.ModelSerializer[Token]):
    agent = serializers.CharField(source="agent.name")
    backend = serializers.CharField(source="backend.name")
    prefix = serializers.CharField(source="display_prefix")
    state = serializers.SerializerMethodField()

    class Meta:
        model = Token
        fields = [
            "id", "agent", "backend", "prefix", "state", "ttl_seconds", "created_at",
            "expires_at", "revoked_at", "last_used_at",
        ]  # fmt: skip

    def get_state(self, token: Token) -> str:
        return token.state()


class ApproveInput(StrictInputSerializer):
    scopes = serializers.ListField(
        child=StrictCharField(max_length=63),
        required=False,
        max_length=32,
        help_text="grant only these (default: everything the agent asked for)",
    )


class RejectInput(StrictInputSerializer):
    reason = StrictCharField(max_length=500, required=False, allow_blank=True)


class GrantInput(GrantPolicyInput):
    """A backend, and optionally the grant's policy (see GrantPolicyInput)."""

    backend = StrictCharField(max_length=63)


class IdentityGrantOutput(serializers.ModelSerializer[IdentityGrant]):
    lifetime = serializers.IntegerField(help_text="seconds each identity token lives")
    created_by = serializers.SerializerMethodField()

    class Meta:
        model = IdentityGrant
        fields = ["id", "audience", "lifetime", "created_at", "created_by"]

    def get_created_by(self, grant: IdentityGrant) -> str | None:
        return grant.created_by.get_username() if grant.created_by else None


class IdentityGrantInput(StrictInputSerializer):
    audience = StrictCharField(max_length=300, help_text="e.g. https://api.anthropic.com")
    lifetime = serializers.JSONField(
        required=False,
        help_text='seconds, or "90s", "10m", "1h"; 1 minute to the issuer\'s token lifetime '
        "(default 10m; again for the same audience changes it)",
    )


def _agents() -> QuerySet[Agent]:
    return Agent.objects.select_related("decided_by").prefetch_related("grants__backend")


class AgentListView(APIView):
    # An agent created here is approved at once: enrolling and approving in one request.
    permission_classes = admin_permissions(Agent, post=("add", "change"))

    @extend_schema(
        operation_id="admin_agents_list",
        parameters=[OpenApiParameter("status", enum=AgentStatus.values)],
        responses=AgentOutput(many=True),
    )
    def get(self, request: Request) -> Response:
        agents = _agents()
        wanted = request.query_params.get("status")
        if wanted is not None:
            if wanted not in AgentStatus.values:
                raise ServiceError(f"status: one of {', '.join(AgentStatus.values)}")
            agents = agents.filter(status=wanted)
        return Response(AgentOutput(agents, many=True).data)

    @extend_schema(
        operation_id="admin_agents_create",
        request=EnrollInput,
        responses={201: CreatedAgentOutput},
        description="Create an agent that is approved at once; its vend token is shown once.",
    )
    def post(self, request: Request) -> Response:
        data = EnrollInput(data=request.data)
        data.is_valid(raise_exception=True)
        created = agent_enroll(
            name=data.validated_data["name"],
            scopes=data.validated_data["scopes"],
            description=data.validated_data.get("description", ""),
            approved_by=request.user,
        )
        body = {**AgentOutput(created.agent).data, "vend_token": created.vend_token}
        return Response(body, status=status.HTTP_201_CREATED)


class AgentDetailView(APIView):
    # Unenrolling keeps the row for history, as the admin's unenroll action does: a change.
    permission_classes = admin_permissions(Agent, delete="change")

    @extend_schema(operation_id="admin_agents_inspect", responses=AgentOutput)
    def get(self, request: Request, agent_id: str) -> Response:
        return Response(AgentOutput(agent_get_by_id(agent_id=agent_id)).data)

    @extend_schema(
        operation_id="admin_agents_unenroll",
        responses={204: OpenApiResponse(description="unenrolled; every token revoked")},
    )
    def delete(self, request: Request, agent_id: str) -> Response:
        agent_unenroll(agent=agent_get_by_id(agent_id=agent_id), by=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AgentGrantView(APIView):
    # Grants (idempotent) and sets the grant's policy.
    permission_classes = admin_permissions(Grant, post=("add", "change"))

    @extend_schema(
        operation_id="admin_agents_grant", request=GrantInput, responses={201: AgentOutput}
    )
    def post(self, request: Request, agent_id: str) -> Response:
        agent = agent_get_by_id(agent_id=agent_id)
        data = GrantInput(data=request.data)
        data.is_valid(raise_exception=True)
        policy = {k: v for k, v in data.validated_data.items() if k != "backend"}
        grant_set(
            agent=agent,
            backend=backend_get(name=data.validated_data["backend"]),
            policy=policy,
            by=request.user,
        )
        return Response(AgentOutput(agent).data, status=status.HTTP_201_CREATED)


class PendingListView(APIView):
    permission_classes = admin_permissions(Agent)

    @extend_schema(
        operation_id="admin_pending_list",
        responses=AgentOutput(many=True),
        description="New agents awaiting approval, and approved ones that asked for more scopes.",
    )
    def get(self, request: Request) -> Response:
        return Response(AgentOutput(agents_waiting(), many=True).data)


class PendingApproveView(APIView):
    permission_classes = admin_permissions(Agent, post="change")

    @extend_schema(
        operation_id="admin_pending_approve", request=ApproveInput, responses=AgentOutput
    )
    def post(self, request: Request, agent_id: str) -> Response:
        agent = agent_get_by_id(agent_id=agent_id)
        data = ApproveInput(data=request.data)
        data.is_valid(raise_exception=True)
        agent = agent_approve(
            agent=agent, by=request.user, scopes=data.validated_data.get("scopes")
        )
        return Response(AgentOutput(agent).data)


class PendingRejectView(APIView):
    permission_classes = admin_permissions(Agent, post="change")

    @extend_schema(operation_id="admin_pending_reject", request=RejectInput, responses=AgentOutput)
    def post(self, request: Request, agent_id: str) -> Response:
        agent = agent_get_by_id(agent_id=agent_id)
        data = RejectInput(data=request.data)
        data.is_valid(raise_exception=True)
        agent = agent_reject(
            agent=agent, by=request.user, reason=data.validated_data.get("reason", "")
        )
        return Response(AgentOutput(agent).data)


class TokenListView(APIView):
    permission_classes = admin_permissions(Token)

    @extend_schema(
        operation_id="admin_tokens_list",
        parameters=[
            OpenApiParameter("agent", description="agent name"),
            OpenApiParameter("backend", description="backend name"),
            OpenApiParameter("state", enum=["live", "all"], description="default: live"),
        ],
        responses=TokenRecordOutput(many=True),
    )
    def get(self, request: Request) -> Response:
        query = TokensQuery(data=request.query_params.dict())
        query.is_valid(raise_exception=True)  # a NUL byte is a 400, not PostgreSQL's 500
        params = query.validated_data
        state = params.get("state", "live")
        if state not in {"live", "all"}:
            raise ServiceError("state: live or all")
        tokens = tokens_list(
            agent_name=params.get("agent"),
            backend_name=params.get("backend"),
            state=TokenState.LIVE if state == "live" else None,
        )
        return Response(TokenRecordOutput(tokens, many=True).data)


class TokensQuery(serializers.Serializer[Any]):
    agent = serializers.CharField(required=False, allow_blank=True)
    backend = serializers.CharField(required=False, allow_blank=True)
    state = serializers.CharField(required=False)


class TokenDetailView(APIView):
    # Revoking keeps the row, as the admin's revoke button does: a change.
    permission_classes = admin_permissions(Token, delete="change")

    @extend_schema(operation_id="admin_tokens_inspect", responses=TokenRecordOutput)
    def get(self, request: Request, token_id: str) -> Response:
        return Response(TokenRecordOutput(token_get(token_id=token_id)).data)

    @extend_schema(
        operation_id="admin_tokens_revoke",
        responses={204: OpenApiResponse(description="revoked at once")},
    )
    def delete(self, request: Request, token_id: str) -> Response:
        token_revoke(token=token_get(token_id=token_id), by=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AgentIdentityListView(APIView):
    permission_classes = admin_permissions(IdentityGrant)

    @extend_schema(
        operation_id="admin_agents_identities_list", responses=IdentityGrantOutput(many=True)
    )
    def get(self, request: Request, agent_id: str) -> Response:
        agent = agent_get_by_id(agent_id=agent_id)
        return Response(IdentityGrantOutput(identity_grants_of(agent), many=True).data)

    @extend_schema(
        operation_id="admin_agents_identities_grant",
        request=IdentityGrantInput,
        responses={201: IdentityGrantOutput},
        description="Let the agent get identity tokens (JWTs) for this audience from "
        "POST /oauth/token; for an audience it already has, change the lifetime.",
    )
    def post(self, request: Request, agent_id: str) -> Response:
        agent = agent_get_by_id(agent_id=agent_id)
        data = IdentityGrantInput(data=request.data)
        data.is_valid(raise_exception=True)
        grant = identity_grant(
            agent=agent,
            audience=data.validated_data["audience"],
            lifetime=data.validated_data.get("lifetime"),
            by=request.user,
        )
        return Response(IdentityGrantOutput(grant).data, status=status.HTTP_201_CREATED)


class AgentIdentityDetailView(APIView):
    permission_classes = admin_permissions(IdentityGrant)

    @extend_schema(
        operation_id="admin_agents_identities_revoke",
        responses={204: OpenApiResponse(description="no more identity tokens for it")},
    )
    def delete(self, request: Request, agent_id: str, grant_id: str) -> Response:
        agent = agent_get_by_id(agent_id=agent_id)
        grant = identity_grant_get(agent=agent, grant_id=grant_id)
        identity_revoke(agent=agent, audience=grant.audience, by=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
