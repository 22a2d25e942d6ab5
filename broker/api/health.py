from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from broker.runtime.health import audit_state, backend_states, health_counts, readiness


class HealthSerializer(serializers.Serializer[None]):
    status = serializers.CharField()
    version = serializers.CharField()
    counts = serializers.DictField(child=serializers.IntegerField(), allow_null=True)


class CheckSerializer(serializers.Serializer[None]):
    ok = serializers.BooleanField()
    detail = serializers.CharField()


class BackendStateSerializer(serializers.Serializer[None]):
    state = serializers.ChoiceField(choices=["unknown", "valid", "invalid", "unreachable"])
    detail = serializers.CharField()


class AuditStateSerializer(serializers.Serializer[None]):
    queued = serializers.IntegerField(help_text="audit events this process has not written yet")
    spill_waiting = serializers.BooleanField(
        help_text="events were spilled to a file and wait to be replayed into the database"
    )


class ReadySerializer(serializers.Serializer[None]):
    ready = serializers.BooleanField()
    checks = serializers.DictField(child=CheckSerializer())
    backends = serializers.DictField(
        child=BackendStateSerializer(), help_text="informational; never affects `ready`"
    )
    audit = AuditStateSerializer(help_text="informational; never affects `ready`")


class HealthView(APIView):
    """Liveness: the process answers. Counts are best effort and never fail the probe."""

    authentication_classes = ()
    permission_classes = (AllowAny,)

    @extend_schema(operation_id="health", responses=HealthSerializer)
    def get(self, request: Request) -> Response:
        try:
            counts: dict[str, int] | None = health_counts()
        except Exception:
            counts = None
        return Response({"status": "ok", "version": settings.VERSION, "counts": counts})


class ReadyView(APIView):
    """Readiness: database, Redis and a Celery worker heartbeat; 503 when any is down."""

    authentication_classes = ()
    permission_classes = (AllowAny,)

    @extend_schema(operation_id="ready", responses={200: ReadySerializer, 503: ReadySerializer})
    def get(self, request: Request) -> Response:
        checks = readiness()
        ready = all(check.ok for check in checks.values())
        body = {
            "ready": ready,
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
            "backends": backend_states(),
            "audit": audit_state(),
        }
        return Response(body, status=200 if ready else 503)
