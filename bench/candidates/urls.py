from __future__ import annotations

from django.urls import path

from bench.candidates.views import proxy

urlpatterns = [path("v1/proxy/<str:backend>/<path:path>", proxy)]
