"""Usage over REST: ``GET /v1/admin/usage/`` for admins, ``GET /v1/usage`` for an agent's own.

Both read the rollups (audit/usage.py); the agent's answer is narrowed to the agent itself
by id before any filter of its own applies, so no parameter can widen it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.models import AuditEvent
from audit.usage import DEFAULT_SINCE, GROUPS, UsageQuery, usage_report
from broker.api.agents import AgentView
from broker.api.auth import admin_permissions
from broker.api.serializers import StrictInputSerializer
from broker.services.access import agent_require_approved

TIME_HELP = "ISO 8601 date or time (UTC unless it says), or a duration back from now: `7d`"
GROUP_HELP = (
    f"comma-separated, any of {', '.join(GROUPS)} (day and hour are UTC; not both); "
    "without it, only the totals"
)
COMMON_PARAMETERS = [
    OpenApiParameter(
        "since", description=f"{TIME_HELP}; default {DEFAULT_SINCE}, rounded down to the hour"
    ),
    OpenApiParameter("until", description=f"{TIME_HELP}; default now, rounded up to the hour"),
    OpenApiParameter("group_by", description=GROUP_HELP),
    OpenApiParameter("backend", description="backend name"),
    OpenApiParameter("model", description="model name"),
]


class UsageInput(StrictInputSerializer):
    """The query string; unknown names are refused."""

    since = serializers.CharField(required=False, allow_blank=True)
    until = serializers.CharField(required=False, allow_blank=True)
    group_by = serializers.CharField(required=False, allow_blank=True)
    agent = serializers.CharField(required=False, allow_blank=True)
    backend = serializers.CharField(required=False, allow_blank=True)
    model = serializers.CharField(required=False, allow_blank=True)


class AgentUsageInput(UsageInput):
    agent = None  # type: ignore[assignment]  # an agent sees its own usage only


class UsageMetrics(serializers.Serializer[Any]):
    calls = serializers.IntegerField(help_text="proxied calls, refused ones included")
    # DRF's metaclass takes fields out of the class, so this does not hide Serializer.errors.
    errors = serializers.IntegerField(  # type: ignore[assignment]
        help_text="calls let through that ended badly: status ≥ 400, upstream unreachable, "
        "a broken stream, cut by keybroker (a client that hung up is not an error)"
    )
    refusals = serializers.IntegerField(
        help_text="calls keybroker refused: bad token, no grant, a policy rule, rate or budget"
    )
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cache_read_tokens = serializers.IntegerField()
    cache_write_tokens = serializers.IntegerField()
    cost_usd = serializers.CharField(help_text="USD, the sum of the calls whose cost is known")
    cost_unknown_calls = serializers.IntegerField(
        help_text="calls with tokens but no price: not in cost_usd, never counted as 0"
    )
    ttfb_p50_ms = serializers.FloatField(
        allow_null=True, help_text="median time to first byte, from buckets (see docs)"
    )
    ttfb_p95_ms = serializers.FloatField(allow_null=True)


class UsageGroup(UsageMetrics):
    agent_id = serializers.UUIDField(required=False, allow_null=True)
    agent = serializers.CharField(required=False, help_text="the agent's name")
    agent_status = serializers.CharField(
        required=False, allow_null=True, help_text="unenrolled: a name that may be reused"
    )
    backend = serializers.CharField(required=False)
    model = serializers.CharField(required=False)
    day = serializers.DateField(required=False, help_text="UTC")
    hour = serializers.DateTimeField(required=False, help_text="UTC, start of the hour")


class UsageOutput(serializers.Serializer[Any]):
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    group_by = serializers.ListField(child=serializers.ChoiceField(choices=GROUPS))
    rolled_up_at = serializers.DateTimeField(
        allow_null=True, help_text="when the rollups last took in new calls (every ~30 s)"
    )
    totals = UsageMetrics()
    groups = UsageGroup(many=True)


def _query(request: Request, serializer: type[UsageInput]) -> UsageQuery:
    params = serializer(data=request.query_params.dict())
    params.is_valid(raise_exception=True)
    return UsageQuery.parse(params.validated_data)


class UsageView(APIView):
    permission_classes = admin_permissions(AuditEvent)

    @extend_schema(
        operation_id="admin_usage",
        parameters=[
            *COMMON_PARAMETERS,
            OpenApiParameter("agent", description="an agent id, or a name (any agent of it)"),
        ],
        responses=UsageOutput,
        description="Calls, errors, refusals, tokens, cost and time to first byte, summed from "
        "the hourly rollups and grouped as asked. Correct to within a minute.",
    )
    def get(self, request: Request) -> Response:
        return Response(usage_report(_query(request, UsageInput)))


class AgentUsageView(AgentView):
    @extend_schema(
        operation_id="agent_usage",
        parameters=COMMON_PARAMETERS,
        responses=UsageOutput,
        description="This agent's own usage, as the admin usage API counts it.",
    )
    def get(self, request: Request) -> Response:
        agent = self.agent(request)
        agent_require_approved(agent)
        query = _query(request, AgentUsageInput)
        mine = dataclasses.replace(query, agent_ids=(str(agent.pk),))
        return Response(usage_report(mine))
