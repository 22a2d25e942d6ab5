"""The live activity page: ``/activity/`` (staff allowed to view audit events)."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from audit.events import KNOWN_ACTIONS, event_json
from audit.selectors import audit_events, audit_viewer
from broker.infra.errors import Unavailable
from broker.models import Grant
from broker.selectors.held import held_calls_waiting

# Shown on load, so the page is never empty; the feed adds to it from then on.
INITIAL_EVENTS = 50
# The page keeps at most this many rows; older ones fall off the bottom.
MAX_ROWS = 500


@staff_member_required
def activity(request: HttpRequest) -> HttpResponse:
    if not audit_viewer(request.user):
        raise PermissionDenied("you need the audit.view_auditevent permission")
    events = [event_json(event) for event in audit_events()[:INITIAL_EVENTS]]
    try:
        held = [call.json() for call in held_calls_waiting()]
    except Unavailable:
        held = []  # Redis is down: no call can be held either; the page says so when it asks
    opts = Grant._meta
    context = {
        **admin.site.each_context(request),
        "title": "Live activity",
        "is_nav_sidebar_enabled": False,  # the feed needs the width
        "kb_events": events,
        "kb_actions": KNOWN_ACTIONS,
        "kb_settings": {
            "initial": INITIAL_EVENTS,
            "max_rows": MAX_ROWS,
            # Deciding a held call takes what changing the grant's policy takes.
            "can_decide": request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}"),
        },
        "kb_held": held,
    }
    return render(request, "activity.html", context)
