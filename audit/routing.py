from __future__ import annotations

from django.urls import URLPattern, path

from audit.consumers import ActivityConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/activity/", ActivityConsumer.as_asgi()),
]
