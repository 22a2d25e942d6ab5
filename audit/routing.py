from __future__ import annotations

from django.urls import URLPattern

# The live activity consumer (/ws/activity/) is added with the audit trail.
websocket_urlpatterns: list[URLPattern] = []
