"""Admin REST API of the audit trail: ``/v1/admin/audit/`` and its exports.

The list pages with an opaque cursor (stable while new events arrive); the exports stream
every matching event, oldest first, as CSV or JSON lines, without holding them in memory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

from django.db.models import Q
from django.http import StreamingHttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.events import EVENT_FIELDS, event_json
from audit.models import AuditEvent
from audit.selectors import AuditFilter, audit_events
from broker.api.auth import admin_permissions
from broker.api.serializers import StrictInputSerializer
from broker.infra.db import db_call
from broker.infra.errors import ServiceError

EXPORT_CHUNK = 1000
PAGE_SIZE_MAX = 1000
# Cells a spreadsheet would run as a formula; agents choose paths and models, so quote them.
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

FILTER_PARAMETERS = [
    OpenApiParameter("agent", description="agent name"),
    OpenApiParameter("agent_id", description="agent id: one agent, though its name be reused"),
    OpenApiParameter("backend", description="backend name"),
    OpenApiParameter("action", description="comma-separated; `token.*` for a family"),
    OpenApiParameter("status", description="HTTP status of a proxied call, or a class: `4xx`"),
    OpenApiParameter("outcome", description="ok, denied, upstream_error, client_gone, …"),
    OpenApiParameter("token", description="a token id or display prefix"),
    OpenApiParameter("model", description="model of a proxied call"),
    OpenApiParameter("since", description="ISO 8601 date or time, or a duration back: `2h`"),
    OpenApiParameter("until", description="ISO 8601 date or time, or a duration back"),
]


class AuditQuery(StrictInputSerializer):
    """The query string: filters, and for the list its cursor. Unknown names are refused."""

    agent = serializers.CharField(required=False, allow_blank=True)
    agent_id = serializers.CharField(required=False, allow_blank=True)
    backend = serializers.CharField(required=False, allow_blank=True)
    action = serializers.CharField(required=False, allow_blank=True)
    status = serializers.CharField(required=False, allow_blank=True)
    outcome = serializers.CharField(required=False, allow_blank=True)
    token = serializers.CharField(required=False, allow_blank=True)
    model = serializers.CharField(required=False, allow_blank=True)
    since = serializers.CharField(required=False, allow_blank=True)
    until = serializers.CharField(required=False, allow_blank=True)
    cursor = serializers.CharField(required=False)
    # Checked here: the paginator quietly answers 100 rows for a page_size it cannot read.
    page_size = serializers.IntegerField(required=False, min_value=1, max_value=PAGE_SIZE_MAX)


def _filter_of(request: Request) -> AuditFilter:
    query = AuditQuery(data=request.query_params.dict())
    query.is_valid(raise_exception=True)
    return AuditFilter.parse(query.validated_data)


class AuditEventOutput(serializers.ModelSerializer[AuditEvent]):
    class Meta:
        model = AuditEvent
        fields = list(EVENT_FIELDS)


class AuditPageOutput(serializers.Serializer[Any]):
    next = serializers.URLField(allow_null=True, help_text="the next (older) page")
    previous = serializers.URLField(allow_null=True, help_text="the previous (newer) page")
    results = AuditEventOutput(many=True)


class AuditCursorPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = PAGE_SIZE_MAX

    def decode_cursor(self, request: Request) -> Any:
        # DRF answers a cursor it cannot read with 404; it is bad input, not a missing page.
        try:
            return super().decode_cursor(request)
        except exceptions.NotFound:
            raise ServiceError("not a cursor from `next` or `previous`", "cursor") from None


class AuditListView(APIView):
    permission_classes = admin_permissions(AuditEvent)

    @extend_schema(
        operation_id="admin_audit_list",
        parameters=[
            *FILTER_PARAMETERS,
            OpenApiParameter("cursor", description="from `next` or `previous`"),
            OpenApiParameter(
                "page_size",
                {"type": "integer", "minimum": 1, "maximum": PAGE_SIZE_MAX},
                description=f"1 to {PAGE_SIZE_MAX} (default 100)",
            ),
        ],
        responses=AuditPageOutput,
        description="Audit events, newest first, filtered; cursor pagination.",
    )
    def get(self, request: Request) -> Response:
        paginator = AuditCursorPagination()
        page = paginator.paginate_queryset(audit_events(_filter_of(request)), request, view=self)
        return paginator.get_paginated_response(AuditEventOutput(page, many=True).data)


def _chunks(audit_filter: AuditFilter) -> AsyncIterator[list[AuditEvent]]:
    """Oldest first, by (created_at, id) keyset: no OFFSET, no long-open cursor."""
    fetch = db_call(_chunk_after)

    async def chunks() -> AsyncIterator[list[AuditEvent]]:
        after: tuple[datetime, int] | None = None
        while True:
            chunk = await fetch(audit_filter, after)
            if not chunk:
                return
            yield chunk
            after = (chunk[-1].created_at, chunk[-1].pk)

    return chunks()


def _chunk_after(audit_filter: AuditFilter, after: tuple[datetime, int] | None) -> list[AuditEvent]:
    events = audit_events(audit_filter).order_by("created_at", "id")
    if after is not None:
        moment, pk = after
        events = events.filter(Q(created_at__gt=moment) | Q(created_at=moment, id__gt=pk))
    return list(events[:EXPORT_CHUNK])


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    if isinstance(value, str) and value.startswith(CSV_FORMULA_START):
        return "'" + value
    return "" if value is None else value


def _csv_lines(rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    for row in rows:
        writer.writerow([_csv_cell(row[name]) for name in EVENT_FIELDS])
    return out.getvalue()


async def _csv(audit_filter: AuditFilter) -> AsyncIterator[str]:
    yield _csv_lines([{name: name for name in EVENT_FIELDS}])
    async for chunk in _chunks(audit_filter):
        yield _csv_lines(event_json(event) for event in chunk)


async def _jsonl(audit_filter: AuditFilter) -> AsyncIterator[str]:
    async for chunk in _chunks(audit_filter):
        yield "".join(json.dumps(event_json(event), default=str) + "\n" for event in chunk)


def _export(
    request: Request, render: Any, content_type: str, extension: str
) -> StreamingHttpResponse:
    params = request.query_params.dict()
    for name in ("cursor", "page_size"):
        if name in params:
            raise ServiceError("exports are not paginated", name)
    response = StreamingHttpResponse(render(_filter_of(request)), content_type=content_type)
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="keybroker-audit-{stamp}.{extension}"'
    return response


class _ExportView(APIView):
    permission_classes = admin_permissions(AuditEvent)

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # Accept: text/csv must not be a 406; errors are still rendered as JSON.
        return super().perform_content_negotiation(request, force=True)


class AuditCsvExportView(_ExportView):
    @extend_schema(
        operation_id="admin_audit_export_csv",
        parameters=FILTER_PARAMETERS,
        responses={(200, "text/csv"): OpenApiResponse(OpenApiTypes.STR)},
        description="Every matching event, oldest first, streamed as CSV with a header row.",
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        return _export(request, _csv, "text/csv; charset=utf-8", "csv")


class AuditJsonlExportView(_ExportView):
    @extend_schema(
        operation_id="admin_audit_export_jsonl",
        parameters=FILTER_PARAMETERS,
        responses={(200, "application/jsonl"): OpenApiResponse(OpenApiTypes.STR)},
        description="Every matching event, oldest first, streamed as one JSON object per line.",
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        return _export(request, _jsonl, "application/jsonl; charset=utf-8", "jsonl")
