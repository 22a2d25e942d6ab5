"""Admin REST API for a backend's key pool: /v1/admin/backends/{name}/keys (issue 15).

A key is named by its fingerprint in the path; no answer ever holds a key. Reading needs
``view_backend``; adding, changing and removing a key change the backend (``change_backend``),
as rotating its key does.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from broker.api.auth import admin_permissions
from broker.api.serializers import (
    StrictBooleanField,
    StrictCharField,
    StrictInputSerializer,
    allow_invalid_field,
)
from broker.models import Backend, BackendKey
from broker.selectors.backend_keys import KeyHealth, key_get, keys_calls, keys_health, keys_of
from broker.services.backend_keys import key_add, key_remove, key_update
from broker.services.backends import backend_get


class KeyValidationOutput(serializers.Serializer[Any]):
    state = serializers.CharField()
    checked_at = serializers.DateTimeField(allow_null=True)
    message = serializers.CharField()


class KeyHealthOutput(serializers.Serializer[Any]):
    state = serializers.CharField(
        help_text="ok, cooling (rate limited, refused, failing or unreachable) or unknown"
    )
    until = serializers.FloatField(allow_null=True, help_text="when a cooldown ends (epoch s)")
    last_error = serializers.CharField(
        help_text='the last answer that set the key aside ("429 at …"), within a day'
    )


class PoolKeyOutput(serializers.Serializer[Any]):
    """A key of the pool as a backend's own output lists it."""

    fingerprint = serializers.CharField()
    position = serializers.IntegerField()
    auth_scheme = serializers.CharField()
    weight = serializers.IntegerField()
    enabled = serializers.BooleanField()
    validation = KeyValidationOutput()
    health = KeyHealthOutput()


class BackendKeyOutput(PoolKeyOutput):
    """A key as …/keys shows it: with its calls, counted from the audit trail."""

    calls = serializers.IntegerField(help_text="calls it served in the last 24 hours")
    created_at = serializers.DateTimeField()


def _key_fields(key: BackendKey, health: KeyHealth) -> dict[str, Any]:
    return {
        "fingerprint": key.fingerprint,
        "position": key.position,
        "auth_scheme": key.auth_scheme,
        "weight": key.weight,
        "enabled": key.enabled,
        "validation": {
            "state": key.validation_state,
            "checked_at": key.validation_checked_at,
            "message": key.validation_message,
        },
        "health": {"state": health.state, "until": health.until, "last_error": health.last_error},
    }


def key_output(key: BackendKey, health: KeyHealth, calls: int = 0) -> dict[str, Any]:
    """A key as the API, the CLI's --json and the admin show it: never the key itself."""
    fields = {**_key_fields(key, health), "calls": calls, "created_at": key.created_at}
    return BackendKeyOutput(fields).data


def keys_output(backend: Backend) -> list[dict[str, Any]]:
    keys = keys_of(backend)
    health = keys_health(backend, keys)
    calls = keys_calls(backend)
    return [
        key_output(key, health.get(key.pk, KeyHealth("ok")), calls.get(key.fingerprint, 0))
        for key in keys
    ]


def pool_output(backend: Backend) -> list[dict[str, Any]]:
    """The backend's keys for its own output (inspect, the REST backend): each key's state
    and health, without the calls, which cost a scan of the audit trail."""
    keys = keys_of(backend)
    health = keys_health(backend, keys)
    return [
        PoolKeyOutput(_key_fields(key, health.get(key.pk, KeyHealth("ok")))).data for key in keys
    ]


class KeyCreateInput(StrictInputSerializer):
    secret = StrictCharField(write_only=True, trim_whitespace=True, max_length=4096)
    weight = serializers.IntegerField(default=1, help_text="share of calls, 1-1000")
    allow_invalid = allow_invalid_field()


class KeyUpdateInput(StrictInputSerializer):
    enabled = StrictBooleanField(required=False)
    weight = serializers.IntegerField(required=False, help_text="share of calls, 1-1000")


FINGERPRINT = OpenApiParameter(
    "fingerprint", str, OpenApiParameter.PATH, description="the key's fingerprint"
)


class BackendKeyListView(APIView):
    permission_classes = admin_permissions(Backend, post="change")

    @extend_schema(operation_id="admin_backend_keys_list", responses=BackendKeyOutput(many=True))
    def get(self, request: Request, name: str) -> Response:
        return Response(keys_output(backend_get(name=name)))

    @extend_schema(
        operation_id="admin_backend_keys_add",
        request=KeyCreateInput,
        responses={201: BackendKeyOutput},
        description="Add a key to the backend's pool; it serves calls at once. It is checked "
        "against the upstream first: 422 `key_invalid` when the upstream refuses it (nothing is "
        "saved, unless `allow_invalid`); an upstream that cannot be reached saves it unchecked "
        "(`validation.state` unreachable). The secret is write-only. 409 when the pool has a "
        "key of that fingerprint.",
    )
    def post(self, request: Request, name: str) -> Response:
        backend = backend_get(name=name)
        data = KeyCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        key = key_add(
            backend=backend,
            secret=data.validated_data["secret"],
            weight=data.validated_data["weight"],
            validate=True,
            allow_invalid=data.validated_data["allow_invalid"],
            by=request.user,
        )
        key.refresh_from_db()
        return Response(key_output(key, KeyHealth("ok")), status=status.HTTP_201_CREATED)


class BackendKeyDetailView(APIView):
    permission_classes = admin_permissions(Backend, delete="change")

    @extend_schema(
        operation_id="admin_backend_keys_update",
        parameters=[FINGERPRINT],
        request=KeyUpdateInput,
        responses=BackendKeyOutput,
        description="Enable, disable or reweigh a key; the next call in every process sees "
        "it. Disabling the last enabled key is a 409.",
    )
    def patch(self, request: Request, name: str, fingerprint: str) -> Response:
        backend = backend_get(name=name)
        key = key_get(backend=backend, fingerprint=fingerprint)
        data = KeyUpdateInput(data=request.data)
        data.is_valid(raise_exception=True)
        key = key_update(
            key=key,
            enabled=data.validated_data.get("enabled"),
            weight=data.validated_data.get("weight"),
            by=request.user,
        )
        health = keys_health(backend, [key]).get(key.pk, KeyHealth("ok"))
        return Response(key_output(key, health, keys_calls(backend).get(key.fingerprint, 0)))

    @extend_schema(
        operation_id="admin_backend_keys_remove",
        parameters=[FINGERPRINT],
        responses={204: None},
        description="Remove a key from the pool; the last enabled key is a 409.",
    )
    def delete(self, request: Request, name: str, fingerprint: str) -> Response:
        backend = backend_get(name=name)
        key_remove(key=key_get(backend=backend, fingerprint=fingerprint), by=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
