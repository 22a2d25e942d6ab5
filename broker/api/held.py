"""Admin REST API for held calls: ``GET /v1/admin/held/`` lists the calls waiting for a
person, ``POST /v1/admin/held/{id}/approve`` and ``…/deny`` decide one (the activity page's
buttons call these with the staff session and its CSRF token)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from broker.api.auth import admin_permissions
from broker.api.serializers import StrictCharField, StrictInputSerializer
from broker.models import Grant
from broker.selectors.held import held_calls_waiting
from broker.services.held import held_call_decide


class HeldCallOutput(serializers.Serializer[Any]):
    id = serializers.CharField()
    agent = serializers.CharField()
    agent_id = serializers.CharField()
    backend = serializers.CharField()
    method = serializers.CharField()
    path = serializers.CharField()
    model = serializers.CharField(help_text="empty when the body names none")
    max_tokens = serializers.IntegerField(allow_null=True)
    stream = serializers.BooleanField()
    rule = serializers.ChoiceField(
        choices=["all", "models", "paths", "max_tokens_above"],
        help_text="which part of the grant's hold rule held it",
    )
    token_prefix = serializers.CharField()
    held_at = serializers.DateTimeField()
    deadline = serializers.DateTimeField(help_text="denied (expired) if nobody decides by then")


class DenyInput(StrictInputSerializer):
    reason = StrictCharField(
        required=False, allow_blank=True, max_length=200, help_text="shown to the agent"
    )


_DECIDED = {
    404: OpenApiResponse(description="no such hold (never held, or ended a while ago)"),
    409: OpenApiResponse(description="already decided by someone, or timed out"),
}


class HeldListView(APIView):
    permission_classes = admin_permissions(Grant)

    @extend_schema(
        operation_id="admin_held_list",
        responses=HeldCallOutput(many=True),
        description="Calls held for approval in every process, oldest first.",
    )
    def get(self, request: Request) -> Response:
        return Response(HeldCallOutput([c.json() for c in held_calls_waiting()], many=True).data)


class HeldApproveView(APIView):
    # Approving lets a call through that its grant's policy set aside: the grant's change
    # permission, as for changing that policy.
    permission_classes = admin_permissions(Grant, post="change")

    @extend_schema(
        operation_id="admin_held_approve",
        request=None,
        responses={200: HeldCallOutput, **_DECIDED},
        description="The call goes upstream as it was sent. The first decision wins.",
    )
    def post(self, request: Request, held_id: str) -> Response:
        call = held_call_decide(held_id=held_id, approve=True, by=request.user)
        return Response(HeldCallOutput(call.json()).data)


class HeldDenyView(APIView):
    permission_classes = admin_permissions(Grant, post="change")

    @extend_schema(
        operation_id="admin_held_deny",
        request=DenyInput,
        responses={200: HeldCallOutput, **_DECIDED},
        description="The agent gets a 403 naming who denied it and why. The first decision wins.",
    )
    def post(self, request: Request, held_id: str) -> Response:
        data = DenyInput(data=request.data)
        data.is_valid(raise_exception=True)
        call = held_call_decide(
            held_id=held_id,
            approve=False,
            by=request.user,
            reason=data.validated_data.get("reason", ""),
        )
        return Response(HeldCallOutput(call.json()).data)
