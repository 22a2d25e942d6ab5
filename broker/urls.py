from __future__ import annotations

from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from broker.api.backends import (
    BackendDetailView,
    BackendListView,
    BackendRotateView,
    BackendValidateView,
)
from broker.api.health import HealthView, ReadyView

admin.site.site_header = "keybroker"
admin.site.site_title = "keybroker admin"
admin.site.index_title = "Credentials, agents and activity"
# "View site" would lead back to the admin itself; the API docs link replaces it.
admin.site.site_url = None

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index"), name="home"),
    path("health", HealthView.as_view(), name="health"),
    path("ready", ReadyView.as_view(), name="ready"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("admin/", admin.site.urls),
    path("v1/admin/backends/", BackendListView.as_view(), name="admin-backends"),
    path("v1/admin/backends/<str:name>", BackendDetailView.as_view(), name="admin-backend"),
    path("v1/admin/backends/<str:name>/rotate", BackendRotateView.as_view()),
    path("v1/admin/backends/<str:name>/validate", BackendValidateView.as_view()),
]

handler404 = "broker.api.errors.json_not_found"
handler500 = "broker.api.errors.json_server_error"
