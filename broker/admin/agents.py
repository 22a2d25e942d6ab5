"""Admin pages for agents: where an admin approves them, shapes their grants and sees what
they did.

Every button and action here calls the same service as the REST API and the CLI; this
module only reads, renders and redirects. Nothing here renders a secret: vend tokens,
``crd_`` tokens and client secrets exist only as digests and short display prefixes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from broker.admin.history import HistoryAdmin
from broker.admin.widgets import acted_on, back, badge, may, post_only, token_badge
from broker.infra.errors import ServiceError
from broker.models import Agent, AgentQuerySet, AgentStatus, Grant, IdentityGrant, Token
from broker.selectors.agents import agent_recent_events, agent_recent_tokens
from broker.services.agents import agent_approve, agent_reject, agent_unenroll
from broker.services.identity import (
    identity_grant,
    identity_grant_get,
    identity_grants_of,
    identity_revoke,
)
from broker.services.policy import (
    GRANT_COLUMNS,
    USD_FIELDS,
    backend_defaults,
    grant_update,
    grant_values,
    hold_text,
    policy_parse_texts,
    usd_text,
)
from keybroker.wire import duration_format

AGENT_STATUS_COLOURS = {
    AgentStatus.PENDING: "#bf8700",
    AgentStatus.APPROVED: "#1a7f37",
    AgentStatus.REJECTED: "#cf222e",
    AgentStatus.UNENROLLED: "#6e7781",
}
# Every field shown is read-only, and none holds a digest: those never reach a page.
AGENT_FIELDS = (
    "id", "name", "description", "status_badge", "vend_token", "enrolled_from", "created_at",
    "decided_at", "decided_by", "last_seen_at", "unenrolled_at",
)  # fmt: skip


class ApproveForm(forms.Form):
    """The requested scopes as checkboxes, all checked: unchecking one narrows the grant."""

    scopes = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="grant"
    )

    def __init__(self, agent: Agent, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = cast(forms.MultipleChoiceField, self.fields["scopes"])
        # Only what the agent asked for can be granted from here; the choices enforce it.
        field.choices = [(scope, scope) for scope in agent.requested_scopes]
        field.initial = list(agent.requested_scopes)


class GrantPolicyForm(forms.Form):
    """A grant's own policy as text, one form per grant on the agent page (prefixed by its
    id). Blank takes the backend's default, shown as the placeholder; the service checks."""

    models = forms.CharField(required=False, label="models", help_text="globs, comma-separated")
    paths = forms.CharField(required=False, label="paths", help_text="globs, comma-separated")
    rpm = forms.CharField(required=False, label="rpm", help_text="requests per minute")
    tpm = forms.CharField(required=False, label="tpm", help_text="tokens per minute")
    daily_tokens = forms.CharField(required=False, label="daily tokens", help_text="UTC day")
    daily_usd = forms.CharField(required=False, label="daily USD", help_text="UTC day")
    monthly_usd = forms.CharField(required=False, label="monthly USD", help_text="UTC month")
    max_tokens = forms.CharField(required=False, label="max tokens", help_text="per request")
    max_concurrent = forms.CharField(
        required=False, label="max concurrent", help_text="calls in flight, per proxy process"
    )
    max_ttl = forms.CharField(required=False, label="max TTL", help_text="of minted tokens")
    hold = forms.CharField(
        required=False,
        label="hold for approval",
        help_text="calls a person approves on the activity page: 'all; timeout=2m' or "
        "'models=claude-opus-*; paths=/v1/messages/batches**; max_tokens_above=4000'",
    )

    def __init__(self, grant: Grant, *args: Any, **kwargs: Any) -> None:
        own = grant_values(grant)
        kwargs.setdefault("initial", {name: _policy_text(name, v) for name, v in own.items()})
        kwargs["prefix"] = f"policy-{grant.pk}"
        super().__init__(*args, **kwargs)
        self.grant = grant
        defaults = {**backend_defaults(grant.backend), "max_ttl": grant.backend.token_ttl_max}
        for name, field in self.fields.items():
            # Greyed out in an empty field: what a blank leaves in force.
            field.widget.attrs["placeholder"] = _policy_text(name, defaults.get(name)) or "none"


def _policy_text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(value)
    if name in USD_FIELDS:
        return usd_text(value)
    if name == "hold":
        return hold_text(value)
    return duration_format(value) if name == "max_ttl" else str(value)


class WaitingFilter(admin.SimpleListFilter):
    title = "decision"
    parameter_name = "waiting"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "waiting for approval")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        # The changelist's queryset comes from Agent's manager, so it knows who waits.
        return cast(AgentQuerySet, queryset).waiting() if self.value() == "yes" else queryset


@admin.register(Agent)
class AgentAdmin(HistoryAdmin[Agent]):
    """Agents enroll over REST or `manage.py agent create`; here they are decided on."""

    list_display = [
        "name",
        "status_badge",
        "requested",
        "decide",
        "granted_scopes",
        "enrolled",
        "last_seen",
    ]
    list_filter = [WaitingFilter, "status"]
    search_fields = ["name", "description"]
    actions = ["approve_selected", "reject_selected", "unenroll_selected"]
    fields = readonly_fields = AGENT_FIELDS

    def get_queryset(self, request: HttpRequest) -> QuerySet[Agent]:
        grants = Prefetch(
            "grants", queryset=Grant.objects.select_related("backend").order_by("backend__name")
        )
        # Built here rather than by super(), which orders before the annotation exists.
        agents = (
            Agent.objects.with_decision_rank().select_related("decided_by").prefetch_related(grants)
        )
        return agents.order_by(*self.get_ordering(request))

    def get_ordering(self, request: HttpRequest) -> list[str]:
        # Who waits for a decision comes first. Here rather than in `ordering`, whose
        # system check only knows model fields, not annotations.
        return ["decision_rank", "name"]

    def get_list_display(self, request: HttpRequest) -> list[str | Callable[[Agent], str | bool]]:
        # The approve/reject buttons only for those who may decide.
        shown = list(super().get_list_display(request))
        return shown if self.has_decide_permission(request) else [c for c in shown if c != "decide"]

    # Agents are never added, edited or deleted here (HistoryAdmin): creation hands out a
    # vend token (shown once, so it belongs to the CLI and the API), and deleting would
    # erase history that unenrolling keeps. The change page is a view with decision buttons.

    def has_decide_permission(self, request: HttpRequest) -> bool:
        return may(request, "change", Agent)

    @admin.display(description="status", ordering="decision_rank")
    def status_badge(self, agent: Agent) -> SafeString:
        title = "asks for more scopes" if agent.is_waiting and agent.is_approved else ""
        colour = AGENT_STATUS_COLOURS.get(AgentStatus(agent.status), "#6e7781")
        return badge("agent", agent.status, colour, title)

    @admin.display(description="granted")
    def granted_scopes(self, agent: Agent) -> str | None:
        return ", ".join(grant.backend.name for grant in agent.grants.all()) or None

    @admin.display(description="requested")
    def requested(self, agent: Agent) -> str | None:
        return ", ".join(agent.requested_scopes) or None

    @admin.display(description="enrolled", ordering="created_at")
    def enrolled(self, agent: Agent) -> datetime:
        return agent.created_at

    @admin.display(description="last seen", ordering="last_seen_at")
    def last_seen(self, agent: Agent) -> datetime | None:
        return agent.last_seen_at

    @admin.display(description="vend token")
    def vend_token(self, agent: Agent) -> str:
        return f"{agent.vend_prefix}…"

    @admin.display(description="decision")
    def decide(self, agent: Agent) -> SafeString | None:
        if not agent.is_waiting:
            return None
        # The changelist is itself a form (for the bulk actions) and forms cannot nest, so
        # the buttons submit that form, CSRF token included, to their own URL.
        return format_html(
            '<button type="submit" class="button kb-approve" formaction="{}">Approve</button> '
            '<button type="submit" class="button kb-reject" formaction="{}">Reject</button>',
            reverse("admin:broker_agent_approve", args=[agent.pk]),
            reverse("admin:broker_agent_reject", args=[agent.pk]),
        )

    def get_urls(self) -> list[URLPattern]:
        site = self.admin_site
        return [
            path(
                "<path:object_id>/approve/",
                post_only(site, self.approve_view),
                name="broker_agent_approve",
            ),
            path(
                "<path:object_id>/reject/",
                post_only(site, self.reject_view),
                name="broker_agent_reject",
            ),
            path(
                "<path:object_id>/grants/<int:grant_id>/policy/",
                post_only(site, self.policy_view),
                name="broker_agent_grant_policy",
            ),
            path(
                "<path:object_id>/identities/",
                post_only(site, self.identity_add_view),
                name="broker_agent_identity_add",
            ),
            path(
                "<path:object_id>/identities/<int:grant_id>/remove/",
                post_only(site, self.identity_remove_view),
                name="broker_agent_identity_remove",
            ),
            *super().get_urls(),
        ]

    def _decidable(self, request: HttpRequest, object_id: str) -> Agent:
        return acted_on(self, request, object_id, allowed=self.has_decide_permission(request))

    def approve_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        agent = self._decidable(request, object_id)
        scopes: list[str] | None = None
        # The change page sends the checkboxes; the list's row button grants the request.
        if "narrowed" in request.POST:
            form = ApproveForm(agent, request.POST)
            if not form.is_valid():
                self.message_user(
                    request,
                    f"agent {agent.name}: its request changed meanwhile; check the scopes again",
                    messages.ERROR,
                )
                return back(request, self._change_url(agent))
            scopes = form.cleaned_data["scopes"]
        self._approve(request, agent, scopes)
        return back(request, self._changelist_url())

    def reject_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        agent = self._decidable(request, object_id)
        self._reject(request, agent, reason=request.POST.get("reason", "")[:500])
        return back(request, self._changelist_url())

    def has_policy_permission(self, request: HttpRequest) -> bool:
        return may(request, "change", Grant)

    def policy_view(self, request: HttpRequest, object_id: str, grant_id: int) -> HttpResponse:
        if not self.has_policy_permission(request):
            raise PermissionDenied
        agent = self.get_object(request, unquote(object_id))
        grants = Grant.objects.select_related("agent", "backend")
        grant = grants.filter(pk=grant_id, agent=agent).first() if agent is not None else None
        if grant is None:
            raise Http404("no such grant")
        form = GrantPolicyForm(grant, request.POST)
        form.is_valid()  # text fields: always valid; the service judges the values
        texts = {name: form.cleaned_data.get(name, "") for name in GRANT_COLUMNS}
        try:
            grant_update(grant=grant, policy=policy_parse_texts(texts), by=request.user)
        except ServiceError as exc:
            self.message_user(
                request, f"{grant}: {exc.message}. Nothing was saved.", messages.ERROR
            )
        else:
            self.message_user(request, f"policy of {grant} saved", messages.SUCCESS)
        return back(request, self._change_url(grant.agent))

    def _identity_agent(self, request: HttpRequest, object_id: str, action: str) -> Agent:
        return acted_on(self, request, object_id, allowed=may(request, action, IdentityGrant))

    def identity_add_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        agent = self._identity_agent(request, object_id, "add")
        lifetime = request.POST.get("identity-lifetime", "").strip()
        try:
            grant = identity_grant(
                agent=agent,
                audience=request.POST.get("identity-audience", ""),
                lifetime=lifetime or None,
                by=request.user,
            )
        except ServiceError as exc:
            self.message_user(request, f"{exc.message}. Nothing was saved.", messages.ERROR)
        else:
            self.message_user(
                request,
                f"{agent.name} may get identity tokens for {grant.audience} "
                f"({duration_format(grant.lifetime)} each)",
                messages.SUCCESS,
            )
        return back(request, self._change_url(agent))

    def identity_remove_view(
        self, request: HttpRequest, object_id: str, grant_id: int
    ) -> HttpResponse:
        agent = self._identity_agent(request, object_id, "delete")
        try:
            grant = identity_grant_get(agent=agent, grant_id=grant_id)
        except ServiceError as exc:
            raise Http404(exc.message) from None
        identity_revoke(agent=agent, audience=grant.audience, by=request.user)
        self.message_user(
            request, f"{agent.name} gets no more identity tokens for {grant.audience}"
        )
        return back(request, self._change_url(agent))

    def _approve(self, request: HttpRequest, agent: Agent, scopes: list[str] | None) -> None:
        requested = list(agent.requested_scopes)
        granting = requested if scopes is None else scopes
        try:
            agent_approve(agent=agent, by=request.user, scopes=scopes)
        except ServiceError as exc:
            self.message_user(request, exc.message, messages.ERROR)
            return
        declined = [scope for scope in requested if scope not in granting]
        text = f"agent {agent.name} approved: granted {', '.join(granting) or 'nothing'}"
        if declined:
            text += f"; declined {', '.join(declined)}"
        self.message_user(request, text, messages.SUCCESS)

    def _reject(self, request: HttpRequest, agent: Agent, reason: str = "") -> None:
        was_pending = agent.status == AgentStatus.PENDING
        requested = ", ".join(agent.requested_scopes)
        try:
            agent_reject(agent=agent, by=request.user, reason=reason)
        except ServiceError as exc:
            self.message_user(request, exc.message, messages.ERROR)
            return
        text = (
            f"agent {agent.name} rejected"
            if was_pending
            else f"agent {agent.name}: request for {requested} declined"
        )
        self.message_user(request, text, messages.SUCCESS)

    @admin.action(description="Approve selected agents", permissions=["decide"])
    def approve_selected(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        for agent in queryset:
            self._approve(request, agent, scopes=None)

    @admin.action(description="Reject selected agents", permissions=["decide"])
    def reject_selected(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        for agent in queryset:
            self._reject(request, agent)

    @admin.action(description="Unenroll selected agents", permissions=["decide"])
    def unenroll_selected(
        self, request: HttpRequest, queryset: QuerySet[Agent]
    ) -> TemplateResponse | None:
        # Unenrolling kills every token at once and cannot be undone: confirm first, as
        # Django's own delete action does.
        if request.POST.get("post") != "yes":
            context = {
                **self.admin_site.each_context(request),
                "title": "Unenroll agents?",
                "opts": self.opts,
                "queryset": queryset,
                "action_checkbox_name": ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(
                request, "admin/broker/agent/unenroll_confirmation.html", context
            )
        for agent in queryset:
            if agent.status == AgentStatus.UNENROLLED:
                self.message_user(request, f"agent {agent.name} was already unenrolled")
                continue
            agent_unenroll(agent=agent, by=request.user)
            self.message_user(
                request, f"agent {agent.name} unenrolled; its tokens are revoked", messages.SUCCESS
            )
        return None

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        agent = self.get_object(request, unquote(object_id))
        if agent is not None and self.has_view_permission(request, agent):
            extra_context = {**self._change_context(request, agent), **(extra_context or {})}
        return super().change_view(request, object_id, form_url, extra_context)

    def _change_context(self, request: HttpRequest, agent: Agent) -> dict[str, Any]:
        now = timezone.now()
        recent = agent_recent_tokens(agent)
        waiting = agent.is_waiting and self.has_decide_permission(request)
        grants = list(agent.grants.select_related("backend"))
        return {
            "kb_agent": agent,
            "kb_grants": grants,
            "kb_policy_forms": [GrantPolicyForm(grant) for grant in grants],
            "kb_can_edit_policy": self.has_policy_permission(request),
            "kb_identities": [(g, duration_format(g.lifetime)) for g in identity_grants_of(agent)],
            "kb_can_add_identity": may(request, "add", IdentityGrant),
            "kb_can_remove_identity": may(request, "delete", IdentityGrant),
            "kb_approve_form": ApproveForm(agent) if waiting else None,
            "kb_requested": agent.requested_scopes,
            "kb_tokens": [(t, t.state(now), token_badge(t, now)) for t in recent.tokens],
            "kb_token_count": recent.total,
            "kb_tokens_url": f"{reverse('admin:broker_token_changelist')}?agent={agent.pk}",
            "kb_can_revoke": may(request, "change", Token),
            "kb_events": agent_recent_events(agent),
            "kb_events_url": f"{reverse('admin:audit_auditevent_changelist')}?agent_id={agent.pk}",
        }

    def _change_url(self, agent: Agent) -> str:
        return reverse("admin:broker_agent_change", args=[agent.pk])

    def _changelist_url(self) -> str:
        return reverse("admin:broker_agent_changelist")
