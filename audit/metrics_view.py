"""``GET /metrics``: the counters every process keeps (audit/metrics.py, broker/infra/
metrics.py) and what is read at scrape time: key states and the spill file."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from audit.models import AuditEvent
from audit.recorder import SPILL_FILE
from broker.api.auth import admin_permissions, client_address
from broker.infra.metrics import metrics_registry
from broker.selectors.backend_keys import keys_by_state

logger = logging.getLogger(__name__)


class KeyStates(Collector):
    """Each backend's keys by state (one grouped query): valid, invalid, unknown and
    unreachable for enabled keys, disabled for the rest; a state with no key reads 0."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            states = keys_by_state()
        except DatabaseError as exc:
            # A database outage is when the audit queue and spill metrics matter most: the
            # scrape goes on without the key states (Prometheus shows them as absent).
            logger.warning("metrics: key states not read (%s)", type(exc).__name__)
            return
        family = GaugeMetricFamily(
            "keybroker_backend_keys",
            "Keys in each backend's pool, by validation state (disabled keys apart).",
            labels=["backend", "state"],
        )
        for (backend, state), count in sorted(states.items()):
            family.add_metric([backend, state], count)
        yield family


class SpillFile(Collector):
    """The bytes waiting in this machine's spill file (and in replays under way)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        spill = Path(settings.DATA_DIR) / SPILL_FILE
        files = [spill, *spill.parent.glob(f"{spill.stem}.replaying.*.jsonl")]
        size = 0
        for file in files:
            with contextlib.suppress(FileNotFoundError):  # a replay just took it
                size += file.stat().st_size
        yield GaugeMetricFamily(
            "keybroker_audit_spill_bytes",
            "Bytes of audit events waiting in this machine's spill file for the database.",
            value=size,
        )


# --- the view ------------------------------------------------------------------------------
def _allowed_address(address: str | None) -> bool:
    if not address or not settings.METRICS_ALLOW:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # an IPv4 client of a server listening on ::
    return any(ip in ipaddress.ip_network(net, strict=False) for net in settings.METRICS_ALLOW)


class MetricsAccess(BasePermission):
    """A client from KEYBROKER_METRICS_ALLOW, or staff who may view the audit trail (an
    admin token or a session): the metrics are the trail's totals."""

    def __init__(self) -> None:
        (viewer,) = admin_permissions(AuditEvent)
        self.viewer = viewer()

    @property
    def message(self) -> str:  # why the viewer check refused, for the error's message
        return str(getattr(self.viewer, "message", "not allowed"))

    def has_permission(self, request: Request, view: APIView) -> bool:
        if _allowed_address(client_address(request)):
            return True
        return self.viewer.has_permission(request, view)


class MetricsView(APIView):
    permission_classes: list[type[BasePermission]] = [MetricsAccess]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # Prometheus asks for OpenMetrics first; errors are still rendered as JSON.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        operation_id="metrics",
        responses={(200, "text/plain"): OpenApiResponse(OpenApiTypes.STR)},
        description=(
            "Prometheus metrics in the text format: proxied calls, refusals, latency, tokens "
            "and cost, the audit queue, key states and Celery tasks (docs/metrics.md). For an "
            "admin token or staff session with view_auditevent, or a client address in "
            "KEYBROKER_METRICS_ALLOW."
        ),
    )
    def get(self, request: Request) -> HttpResponse:
        # As prometheus_client's own exporter answers: OpenMetrics when the scraper asks
        # for it (Prometheus does), else the text format.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        registry = metrics_registry([KeyStates(), SpillFile()])
        return HttpResponse(encode(registry), content_type=content_type)
