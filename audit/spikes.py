"""The spike rule (issue 17): an agent's last hour far above its own recent baseline.

Every 10 minutes (beat), for each agent with proxied calls in the last 25 hours:

- **cost**: its cost in the last hour is more than ``KEYBROKER_ALERT_SPIKE_FACTOR`` (3) times
  its mean hourly cost over the 24 hours before, and at least
  ``KEYBROKER_ALERT_SPIKE_MIN_USD`` ($1.00);
- **error rate**: the share of its calls in the last hour that failed (status 4xx or 5xx,
  or no answer from the upstream) is more than the factor times that share over the 24
  hours before, with at least ``KEYBROKER_ALERT_SPIKE_MIN_ERRORS`` (20) failed calls.

A spike is recorded as an ``agent.spike`` audit event naming the rule and the numbers,
which is what the alert says; the same agent and rule alert again only after 6 hours.
One query, over the ``(action, created_at)`` index, bounded to 25 hours of proxied calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import redis
from django.conf import settings
from django.db.models import Count, Q, Sum
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import audit_record
from broker.infra.redis import redis_client, redis_key
from broker.models import Agent

logger = logging.getLogger(__name__)

BASELINE_HOURS = 24
FAILED = Q(status__gte=400) | Q(outcome__in=["upstream_error", "upstream_broke"])


@dataclass(frozen=True)
class Spike:
    agent: str
    rule: str  # "cost" or "error_rate"
    message: str
    last_hour: str
    baseline: str


def _rate(errors: int, calls: int) -> float:
    return errors / calls if calls else 0.0


def spikes_find(*, now: datetime | None = None) -> list[Spike]:
    """Every agent and rule over its baseline now (nothing is recorded)."""
    now = now or timezone.now()
    hour = now - timedelta(hours=1)
    recent = Q(created_at__gte=hour)
    before = Q(created_at__lt=hour)
    rows = (
        AuditEvent.objects.filter(
            action="proxy.request",
            created_at__gte=hour - timedelta(hours=BASELINE_HOURS),
            created_at__lt=now,
        )
        .exclude(agent="")
        .order_by()  # the model's ordering would join the GROUP BY
        .values("agent")
        .annotate(
            hour_cost=Sum("cost_usd", filter=recent),
            base_cost=Sum("cost_usd", filter=before),
            hour_calls=Count("id", filter=recent),
            hour_errors=Count("id", filter=recent & FAILED),
            base_calls=Count("id", filter=before),
            base_errors=Count("id", filter=before & FAILED),
        )
    )
    factor = settings.ALERT_SPIKE_FACTOR
    floor = Decimal(settings.ALERT_SPIKE_MIN_USD)
    found = []
    for row in rows:
        agent = row["agent"]
        cost = row["hour_cost"] or Decimal(0)
        mean = (row["base_cost"] or Decimal(0)) / BASELINE_HOURS
        if cost >= floor and cost > factor * mean:
            found.append(
                Spike(
                    agent,
                    "cost",
                    f"cost spike: ${cost:.2f} in the last hour, over {factor} times its mean of "
                    f"${mean:.2f} an hour in the 24 hours before (and over ${floor:.2f})",
                    f"{cost:.6f}",
                    f"{mean:.6f}",
                )
            )
        rate = _rate(row["hour_errors"], row["hour_calls"])
        base_rate = _rate(row["base_errors"], row["base_calls"])
        if row["hour_errors"] >= settings.ALERT_SPIKE_MIN_ERRORS and rate > factor * base_rate:
            found.append(
                Spike(
                    agent,
                    "error_rate",
                    f"error-rate spike: {row['hour_errors']} of {row['hour_calls']} calls "
                    f"failed in the last hour ({rate:.0%}), over {factor} times its rate of "
                    f"{base_rate:.0%} in the 24 hours before (and at least "
                    f"{settings.ALERT_SPIKE_MIN_ERRORS} failures)",
                    f"{rate:.4f}",
                    f"{base_rate:.4f}",
                )
            )
    return found


def _first_in_a_while(spike: Spike) -> bool:
    try:
        return bool(
            redis_client().set(
                redis_key("alerts", "spike", spike.agent, spike.rule),
                "1",
                nx=True,
                ex=settings.ALERT_SPIKE_QUIET_SECONDS,
            )
        )
    except (redis.RedisError, OSError):
        return True


def spikes_check(*, now: datetime | None = None) -> list[Spike]:
    """Record (and so alert) each spike found, unless the same one was within 6 hours."""
    recorded = []
    for spike in spikes_find(now=now):
        if not _first_in_a_while(spike):
            continue
        agent = Agent.objects.filter(name=spike.agent).order_by("-pk").first()
        if agent is None:
            continue  # its rows outlived it
        audit_record(
            action="agent.spike",
            message=spike.message,
            agent=agent,
            rule=spike.rule,
            last_hour=spike.last_hour,
            baseline=spike.baseline,
            factor=settings.ALERT_SPIKE_FACTOR,
        )
        recorded.append(spike)
    return recorded
