"""Admin REST API of alert channels: ``/v1/admin/notifications/`` (issue 17).

No answer holds a channel's URL or signing secret, except the answer that creates a
webhook, which holds its signing secret once.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.channels import (
    channel_create,
    channel_get,
    channel_remove,
    channel_test,
    channel_update,
)
from audit.models import ChannelKind, NotificationChannel, NotificationDelivery
from audit.notify import SUBSCRIBABLE
from broker.api.auth import admin_permissions
from broker.api.serializers import StrictBooleanField, StrictCharField, StrictInputSerializer

DELIVERIES_SHOWN = 50


class ChannelInput(StrictInputSerializer):
    kind = serializers.ChoiceField(choices=ChannelKind.choices, default=ChannelKind.WEBHOOK)
    url = StrictCharField(
        write_only=True,
        max_length=4000,
        help_text="the webhook or Slack incoming-webhook URL; for email, the addresses "
        "(comma separated). Stored encrypted, never shown again.",
    )
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=SUBSCRIBABLE), allow_empty=False, max_length=20
    )


class ChannelUpdateInput(StrictInputSerializer):
    enabled = StrictBooleanField(required=False, help_text="false pauses the channel")
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=SUBSCRIBABLE),
        allow_empty=False,
        max_length=20,
        required=False,
    )


class ChannelOutput(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    kind = serializers.CharField()
    target = serializers.CharField(
        source="target_display", help_text="scheme and host only; the addresses of email"
    )
    events = serializers.ListField(child=serializers.CharField())
    enabled = serializers.BooleanField()
    signing_secret_hint = serializers.CharField(
        source="secret_hint", help_text="the signing secret's last characters (webhooks)"
    )
    created_at = serializers.DateTimeField()
    created_by = serializers.CharField()


class CreatedChannelOutput(ChannelOutput):
    signing_secret = serializers.CharField(
        help_text="webhooks: the HMAC-SHA256 key of X-Keybroker-Signature, shown only here"
    )


class AttemptOutput(serializers.Serializer[Any]):
    number = serializers.IntegerField()
    at = serializers.DateTimeField()
    status = serializers.IntegerField(allow_null=True, help_text="the receiver's answer")
    error = serializers.CharField()
    duration_ms = serializers.FloatField()


class DeliveryOutput(serializers.Serializer[Any]):
    id = serializers.UUIDField()
    event = serializers.CharField()
    state = serializers.CharField(help_text="pending, retrying, delivered or failed")
    attempts = AttemptOutput(many=True, source="attempt_log.all")
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    payload = serializers.JSONField(help_text="the body a webhook receives")


class ChannelListView(APIView):
    permission_classes = admin_permissions(NotificationChannel)

    @extend_schema(operation_id="admin_notifications_list", responses=ChannelOutput(many=True))
    def get(self, request: Request) -> Response:
        return Response(ChannelOutput(NotificationChannel.objects.all(), many=True).data)

    @extend_schema(
        operation_id="admin_notifications_create",
        request=ChannelInput,
        responses={201: CreatedChannelOutput},
        description="Add a channel. A webhook's signing secret is in this answer only.",
    )
    def post(self, request: Request) -> Response:
        data = ChannelInput(data=request.data)
        data.is_valid(raise_exception=True)
        created = channel_create(**data.validated_data, by=request.user)
        body = {
            **ChannelOutput(created.channel).data,
            "signing_secret": created.signing_secret,
        }
        return Response(body, status=status.HTTP_201_CREATED)


class ChannelDetailView(APIView):
    permission_classes = admin_permissions(NotificationChannel)

    @extend_schema(operation_id="admin_notifications_get", responses=ChannelOutput)
    def get(self, request: Request, channel_id: str) -> Response:
        return Response(ChannelOutput(channel_get(channel_id=channel_id)).data)

    @extend_schema(
        operation_id="admin_notifications_update",
        request=ChannelUpdateInput,
        responses=ChannelOutput,
        description="Pause or resume a channel (`enabled`), or change its `events`.",
    )
    def patch(self, request: Request, channel_id: str) -> Response:
        channel = channel_get(channel_id=channel_id)
        data = ChannelUpdateInput(data=request.data)
        data.is_valid(raise_exception=True)
        channel = channel_update(channel=channel, **data.validated_data, by=request.user)
        return Response(ChannelOutput(channel).data)

    @extend_schema(operation_id="admin_notifications_remove", responses={204: None})
    def delete(self, request: Request, channel_id: str) -> Response:
        channel_remove(channel=channel_get(channel_id=channel_id), by=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ChannelTestView(APIView):
    permission_classes = admin_permissions(NotificationChannel, post="change")

    @extend_schema(
        operation_id="admin_notifications_test",
        request=None,
        responses={202: DeliveryOutput},
        description="Queue a `test` alert to the channel; its delivery log says how it went.",
    )
    def post(self, request: Request, channel_id: str) -> Response:
        delivery = channel_test(channel=channel_get(channel_id=channel_id))
        return Response(DeliveryOutput(delivery).data, status=status.HTTP_202_ACCEPTED)


class ChannelDeliveriesView(APIView):
    permission_classes = admin_permissions(NotificationChannel)

    @extend_schema(
        operation_id="admin_notifications_deliveries",
        responses=DeliveryOutput(many=True),
        description=f"The channel's last {DELIVERIES_SHOWN} deliveries, newest first, "
        "each with its attempts.",
    )
    def get(self, request: Request, channel_id: str) -> Response:
        channel = channel_get(channel_id=channel_id)
        deliveries = NotificationDelivery.objects.filter(channel=channel).prefetch_related(
            "attempt_log"
        )[:DELIVERIES_SHOWN]
        return Response(DeliveryOutput(deliveries, many=True).data)
