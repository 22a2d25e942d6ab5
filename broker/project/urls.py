from __future__ import annotations

from django.contrib import admin
from django.urls import path, re_path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from audit import alerts_api, metrics_view, usage_api, usage_page
from audit import api as audit_api
from audit import views as audit_views
from broker.api import admin_agents, agents, backend_keys, held, oidc, policy
from broker.api.backends import (
    BackendDetailView,
    BackendListView,
    BackendRotateView,
    BackendValidateView,
)
from broker.api.health import HealthView, ReadyView
from broker.api.misdirected import SDK_PATHS, sdk_call_at_root

admin.site.site_header = "keybroker"
admin.site.site_title = "keybroker admin"
admin.site.index_title = "Credentials, agents and activity"
# "View site" would lead back to the admin itself; the API docs link replaces it.
admin.site.site_url = None
# The index and the breadcrumbs lead everywhere; the sidebar's 300 px are the lists' width.
admin.site.enable_nav_sidebar = False

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index"), name="home"),
    path("health", HealthView.as_view(), name="health"),
    path("ready", ReadyView.as_view(), name="ready"),
    path("metrics", metrics_view.MetricsView.as_view(), name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("admin/", admin.site.urls),
    re_path(SDK_PATHS, sdk_call_at_root),
    path("v1/admin/backends/", BackendListView.as_view(), name="admin-backends"),
    path("v1/admin/backends/<str:name>", BackendDetailView.as_view(), name="admin-backend"),
    path("v1/admin/backends/<str:name>/rotate", BackendRotateView.as_view()),
    path("v1/admin/backends/<str:name>/validate", BackendValidateView.as_view()),
    path("v1/admin/backends/<str:name>/policy", policy.BackendPolicyView.as_view()),
    path("v1/admin/backends/<str:name>/keys", backend_keys.BackendKeyListView.as_view()),
    path(
        "v1/admin/backends/<str:name>/keys/<str:fingerprint>",
        backend_keys.BackendKeyDetailView.as_view(),
    ),
    path("v1/admin/agents/", admin_agents.AgentListView.as_view()),
    path("v1/admin/agents/<str:agent_id>", admin_agents.AgentDetailView.as_view()),
    path("v1/admin/agents/<str:agent_id>/grants", admin_agents.AgentGrantView.as_view()),
    path(
        "v1/admin/agents/<str:agent_id>/identities",
        admin_agents.AgentIdentityListView.as_view(),
    ),
    path(
        "v1/admin/agents/<str:agent_id>/identities/<str:grant_id>",
        admin_agents.AgentIdentityDetailView.as_view(),
    ),
    path(
        "v1/admin/agents/<str:agent_id>/grants/<str:backend>",
        policy.GrantPolicyView.as_view(),
    ),
    path("v1/admin/pending/", admin_agents.PendingListView.as_view()),
    path("v1/admin/pending/<str:agent_id>/approve", admin_agents.PendingApproveView.as_view()),
    path("v1/admin/pending/<str:agent_id>/reject", admin_agents.PendingRejectView.as_view()),
    path("v1/admin/tokens/", admin_agents.TokenListView.as_view()),
    path("v1/admin/tokens/<str:token_id>", admin_agents.TokenDetailView.as_view()),
    # Calls held for a person's approval (a grant's hold rule); the activity page decides.
    path("v1/admin/held/", held.HeldListView.as_view(), name="admin-held"),
    path("v1/admin/held/<str:held_id>/approve", held.HeldApproveView.as_view()),
    path("v1/admin/held/<str:held_id>/deny", held.HeldDenyView.as_view()),
    # The audit trail: its admin API and the live activity page (the feed is /ws/activity/).
    path("v1/admin/audit/", audit_api.AuditListView.as_view(), name="admin-audit"),
    path("v1/admin/audit/export.csv", audit_api.AuditCsvExportView.as_view()),
    path("v1/admin/audit/export.jsonl", audit_api.AuditJsonlExportView.as_view()),
    path("activity/", audit_views.activity, name="activity"),
    # Usage, from the rollups: the admin API, the page, and each agent's own.
    path("v1/admin/usage/", usage_api.UsageView.as_view(), name="admin-usage"),
    path("usage/", usage_page.usage, name="usage"),
    path("v1/usage", usage_api.AgentUsageView.as_view()),
    # Alerts: where they go, and what became of each (issue 17).
    path("v1/admin/notifications/", alerts_api.ChannelListView.as_view()),
    path("v1/admin/notifications/<str:channel_id>", alerts_api.ChannelDetailView.as_view()),
    path("v1/admin/notifications/<str:channel_id>/test", alerts_api.ChannelTestView.as_view()),
    path(
        "v1/admin/notifications/<str:channel_id>/deliveries",
        alerts_api.ChannelDeliveriesView.as_view(),
    ),
    # The agent API (paths follow Creddy's).
    path("v1/enroll", agents.EnrollView.as_view()),
    path("v1/enroll/status", agents.EnrollStatusView.as_view()),
    path("v1/status", agents.StatusView.as_view()),
    path("v1/request", agents.RequestScopesView.as_view()),
    path("v1/credentials/<str:backend>", agents.CredentialsView.as_view()),
    path("v1/active", agents.ActiveView.as_view()),
    path("v1/active/<str:token_id>", agents.ActiveDetailView.as_view()),
    path("v1/self", agents.SelfView.as_view()),
    path("v1/clients", agents.ClientsView.as_view()),
    # keybroker as an OIDC provider.
    path(".well-known/openid-configuration", oidc.DiscoveryView.as_view()),
    path(".well-known/jwks.json", oidc.JwksView.as_view()),
    path("oauth/token", oidc.TokenView.as_view()),
]

handler404 = "broker.api.errors.json_not_found"
handler500 = "broker.api.errors.json_server_error"
