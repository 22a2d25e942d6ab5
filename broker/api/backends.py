"""Admin REST API for backends: /v1/admin/backends/."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from broker.api.auth import admin_permissions
from broker.api.backend_keys import PoolKeyOutput, pool_output
from broker.api.serializers import (
    StrictBooleanField,
    StrictCharField,
    StrictInputSerializer,
    allow_invalid_field,
)
from broker.kinds import DEFAULT_KIND
from broker.models import Backend
from broker.services.backends import (
    FederationSettings,
    TtlBounds,
    backend_add,
    backend_federation,
    backend_get,
    backend_remove,
    backend_rotate,
    backend_update,
    backend_validate,
)
from broker.services.oidc import backend_subject


class FederationOutput(serializers.Serializer[Any]):
    federation_rule_id = serializers.CharField()
    organization_id = serializers.CharField()
    service_account_id = serializers.CharField()
    workspace_id = serializers.CharField()
    audience = serializers.CharField(help_text="the aud of keybroker's JWT for this upstream")
    subject = serializers.CharField(help_text="the sub of keybroker's JWT for this upstream")


class BackendOutput(serializers.ModelSerializer[Backend]):
    fingerprint = serializers.CharField(source="secret_fingerprint")
    ttl = serializers.SerializerMethodField()
    validation = serializers.SerializerMethodField()
    federation = serializers.SerializerMethodField(
        help_text="workload identity settings (kind anthropic-wif), else null"
    )
    keys = serializers.SerializerMethodField(
        help_text="the pool's keys in order (fingerprint, weight, enabled, validation, "
        "health), never a secret; empty for a backend that stores none"
    )

    class Meta:
        model = Backend
        fields = [
            "name", "kind", "base_url", "fingerprint", "auth_scheme", "client_key", "enabled",
            "ttl", "validation", "federation", "keys", "created_at", "rotated_at",
        ]  # fmt: skip

    @extend_schema_field(PoolKeyOutput(many=True))
    def get_keys(self, backend: Backend) -> list[dict[str, Any]]:
        return pool_output(backend)

    @extend_schema_field(FederationOutput(allow_null=True))
    def get_federation(self, backend: Backend) -> dict[str, str] | None:
        if not backend.federated:
            return None
        return {**backend_federation(backend), "subject": backend_subject(backend.name)}

    def get_ttl(self, backend: Backend) -> dict[str, int]:
        return {
            "min": backend.token_ttl_min,
            "default": backend.token_ttl_default,
            "max": backend.token_ttl_max,
        }

    def get_validation(self, backend: Backend) -> dict[str, Any]:
        return {
            "state": backend.validation_state,
            "checked_at": backend.validation_checked_at,
            "message": backend.validation_message,
        }


class TtlInput(StrictInputSerializer):
    """Seconds; the bounds' rule (1s <= min <= default <= max <= 24h) is TtlBounds', so the
    API and the admin refuse the same bounds in the same words."""

    min = serializers.IntegerField()
    default = serializers.IntegerField()
    max = serializers.IntegerField()


class FederationInput(StrictInputSerializer):
    """Workload identity settings of an anthropic-wif backend: ids, not secrets."""

    federation_rule_id = StrictCharField(max_length=100, required=False, help_text="fdrl_…")
    organization_id = StrictCharField(max_length=100, required=False, help_text="a UUID")
    service_account_id = StrictCharField(
        max_length=100, required=False, allow_blank=True, help_text="svac_…"
    )
    workspace_id = StrictCharField(
        max_length=100, required=False, allow_blank=True, help_text="wrkspc_… or default"
    )
    audience = StrictCharField(
        max_length=255,
        required=False,
        allow_blank=True,
        help_text="aud of keybroker's JWT (default https://api.anthropic.com)",
    )


class BackendCreateInput(StrictInputSerializer):
    # A bound on the body only: what a name may be is backend_clean_name's rule.
    name = StrictCharField(max_length=255)
    kind = StrictCharField(max_length=32, default=DEFAULT_KIND)
    secret = StrictCharField(
        write_only=True, trim_whitespace=True, max_length=4096, required=False, allow_blank=True
    )
    client_key = StrictBooleanField(
        default=False, help_text="store no secret; agents send their own in X-Anthropic-Key"
    )
    base_url = StrictCharField(max_length=300, required=False)
    ttl = TtlInput(required=False)
    federation = FederationInput(required=False, help_text="kind anthropic-wif only")
    allow_invalid = allow_invalid_field()


class BackendUpdateInput(StrictInputSerializer):
    base_url = StrictCharField(
        max_length=300,
        required=False,
        help_text="a new host (scheme, host or port) needs `secret` too, unless it is the "
        "provider's own or listed in KEYBROKER_ALLOWED_UPSTREAM_HOSTS",
    )
    secret = StrictCharField(
        write_only=True,
        trim_whitespace=True,
        max_length=4096,
        required=False,
        help_text="the backend's current key, entered again: confirms a move to a new host "
        "(a key that does not match is a 403 and changes nothing; to replace it, rotate)",
    )
    ttl = TtlInput(required=False)
    enabled = StrictBooleanField(required=False)
    federation = FederationInput(
        required=False, help_text="anthropic-wif only; fields left out keep their values"
    )


class SecretInput(StrictInputSerializer):
    secret = StrictCharField(write_only=True, trim_whitespace=True, max_length=4096)
    fingerprint = StrictCharField(
        max_length=64,
        required=False,
        help_text="the key to replace, when the backend has several (see …/keys)",
    )
    allow_invalid = allow_invalid_field()


def _ttl(data: dict[str, Any]) -> TtlBounds | None:
    ttl = data.get("ttl")
    return TtlBounds(ttl["min"], ttl["max"], ttl["default"]) if ttl else None


def _federation(data: dict[str, Any]) -> FederationSettings | None:
    given = data.get("federation")
    return FederationSettings(**given) if given is not None else None


class BackendListView(APIView):
    permission_classes = admin_permissions(Backend)

    @extend_schema(operation_id="admin_backends_list", responses=BackendOutput(many=True))
    def get(self, request: Request) -> Response:
        return Response(BackendOutput(Backend.objects.all(), many=True).data)

    @extend_schema(
        operation_id="admin_backends_create",
        request=BackendCreateInput,
        responses={201: BackendOutput},
        description="Add a backend. Its key is checked against the upstream first (a few "
        "seconds at most): 422 `key_invalid` naming the upstream's answer when it refuses the "
        "key (nothing is saved, unless `allow_invalid`); an upstream that cannot be reached "
        "saves it unchecked (`validation.state` unreachable; the scheduled validation checks it "
        "again). The secret is write-only: no response ever contains it. An anthropic-wif "
        "backend takes `federation` instead of a secret.",
    )
    def post(self, request: Request) -> Response:
        data = BackendCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        backend = backend_add(
            name=data.validated_data["name"],
            kind=data.validated_data["kind"],
            secret=data.validated_data.get("secret", ""),
            client_key=data.validated_data["client_key"],
            base_url=data.validated_data.get("base_url"),
            ttl=_ttl(data.validated_data),
            federation=_federation(data.validated_data),
            validate=True,
            allow_invalid=data.validated_data["allow_invalid"],
            by=request.user,
        )
        backend.refresh_from_db()
        return Response(BackendOutput(backend).data, status=status.HTTP_201_CREATED)


class BackendDetailView(APIView):
    permission_classes = admin_permissions(Backend)

    @extend_schema(operation_id="admin_backends_inspect", responses=BackendOutput)
    def get(self, request: Request, name: str) -> Response:
        return Response(BackendOutput(backend_get(name=name)).data)

    @extend_schema(
        operation_id="admin_backends_update",
        request=BackendUpdateInput,
        responses=BackendOutput,
        description="Change a backend's settings. Moving it to a new host needs its key in "
        "`secret` (or the host in KEYBROKER_ALLOWED_UPSTREAM_HOSTS): 403 naming `base_url` "
        "otherwise, and nothing changes.",
    )
    def patch(self, request: Request, name: str) -> Response:
        backend = backend_get(name=name)
        data = BackendUpdateInput(data=request.data)
        data.is_valid(raise_exception=True)
        backend = backend_update(
            backend=backend,
            base_url=data.validated_data.get("base_url"),
            ttl=_ttl(data.validated_data),
            enabled=data.validated_data.get("enabled"),
            federation=_federation(data.validated_data),
            secret=data.validated_data.get("secret"),
            by=request.user,
        )
        return Response(BackendOutput(backend).data)

    @extend_schema(operation_id="admin_backends_remove", responses={204: None})
    def delete(self, request: Request, name: str) -> Response:
        force = request.query_params.get("force", "").lower() in {"1", "true", "yes"}
        backend_remove(backend=backend_get(name=name), force=force, by=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class BackendRotateView(APIView):
    permission_classes = admin_permissions(Backend, post="change")

    @extend_schema(
        operation_id="admin_backends_rotate",
        request=SecretInput,
        responses=BackendOutput,
        description="Replace the key (the only one, or the one named by `fingerprint`); "
        "agents and their live tokens keep working. The new key is checked first, as on add: "
        "422 `key_invalid` when the upstream refuses it, unless `allow_invalid`.",
    )
    def post(self, request: Request, name: str) -> Response:
        backend = backend_get(name=name)
        data = SecretInput(data=request.data)
        data.is_valid(raise_exception=True)
        backend = backend_rotate(
            backend=backend,
            secret=data.validated_data["secret"],
            fingerprint=data.validated_data.get("fingerprint"),
            validate=True,
            allow_invalid=data.validated_data["allow_invalid"],
            by=request.user,
        )
        backend.refresh_from_db()
        return Response(BackendOutput(backend).data)


class BackendValidateView(APIView):
    permission_classes = admin_permissions(Backend, post="change")

    @extend_schema(
        operation_id="admin_backends_validate",
        request=None,
        responses=BackendOutput,
        description="Check the secret against the upstream's GET /v1/models now.",
    )
    def post(self, request: Request, name: str) -> Response:
        backend = backend_get(name=name)
        backend_validate(backend=backend)
        return Response(BackendOutput(backend).data)
