"""The admin index, with the agents that wait for a decision and the backends whose key
does not work on top, and a link to usage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse

from broker.admin.widgets import may
from broker.models import Agent, Backend
from broker.selectors.agents import agents_waiting
from broker.selectors.backend_keys import backends_not_working

WAITING_SHOWN = 5

IndexView = Callable[[HttpRequest, dict[str, Any] | None], TemplateResponse]


def _waiting_context(request: HttpRequest) -> dict[str, Any]:
    if not (may(request, "view", Agent) or may(request, "change", Agent)):
        return {}
    waiting = agents_waiting()
    return {
        "kb_waiting": waiting[:WAITING_SHOWN],
        "kb_waiting_count": len(waiting),
        "kb_waiting_url": f"{reverse('admin:broker_agent_changelist')}?waiting=yes",
        "kb_may_decide": may(request, "change", Agent),
    }


def _usage_context(request: HttpRequest) -> dict[str, Any]:
    # The usage page reads the audit trail's rollups: those who may view the trail see it.
    if not request.user.has_perm("audit.view_auditevent"):
        return {}
    return {"kb_usage_url": reverse("usage")}


def _broken_backends_context(request: HttpRequest) -> dict[str, Any]:
    if not (may(request, "view", Backend) or may(request, "change", Backend)):
        return {}
    return {"kb_broken_backends": backends_not_working()}


def _index_with_waiting_agents(stock: IndexView) -> IndexView:
    def index(
        request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        return stock(
            request,
            {
                **_waiting_context(request),
                **_broken_backends_context(request),
                **_usage_context(request),
                **(extra_context or {}),
            },
        )

    return index


# The index shows how many agents wait for a decision. keybroker uses Django's default
# site (a custom AdminSite would mean new settings), so its index view gets the count
# through a wrapper; the site builds its URLs lazily, after this module is imported.
admin.site.index = _index_with_waiting_agents(admin.site.index)  # type: ignore[method-assign,assignment]
