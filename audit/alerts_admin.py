"""Admin pages for alerts (issue 17): channels (added through the services, a "send test"
action) and the delivery log, read-only, with each attempt."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.html import format_html_join
from django.utils.safestring import SafeString

from audit.channels import channel_create, channel_remove, channel_test, channel_update
from audit.models import ChannelKind, DeliveryAttempt, NotificationChannel, NotificationDelivery
from audit.notify import SUBSCRIBABLE
from broker.admin.history import HistoryAdmin
from broker.infra.errors import ServiceError


class ChannelAddForm(forms.ModelForm[NotificationChannel]):
    user: Any = None
    kind = forms.ChoiceField(choices=ChannelKind.choices, initial=ChannelKind.WEBHOOK)
    url = forms.CharField(
        label="URL or addresses",
        max_length=4000,
        # A Slack URL is a credential: never echoed back into the page.
        widget=forms.PasswordInput(render_value=False, attrs={"size": 80}),
        help_text="the webhook or Slack incoming-webhook URL; for email, addresses separated "
        "by commas. Stored encrypted, never shown again.",
    )
    events = forms.MultipleChoiceField(
        choices=[(event, event) for event in SUBSCRIBABLE],
        widget=forms.CheckboxSelectMultiple,
    )

    class Meta:
        model = NotificationChannel
        fields: list[str] = []

    def _post_clean(self) -> None:
        """The service validated and made the channel in clean(): the model's own checks
        of a blank instance would only refuse what was already made."""

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        try:
            self.created = channel_create(
                kind=data["kind"],
                url=data["url"],
                events=data["events"],
                by=self.user,
            )
        except ServiceError as error:
            for field, texts in error.errors.items():
                for text in texts:
                    self.add_error(field if field in self.fields else None, text)
        return data


class AttemptInline(admin.TabularInline[DeliveryAttempt, NotificationDelivery]):
    model = DeliveryAttempt
    fields = ("number", "at", "status", "error", "duration_ms")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(NotificationChannel)
class NotificationChannelAdmin(admin.ModelAdmin[NotificationChannel]):
    """Added here or with the API or `manage.py notify`; changed by removing and adding,
    since its URL is write-only and its secret is shown only when it is made."""

    list_display = ["id", "kind", "target_display", "events_shown", "enabled", "secret_hint",
                    "created_at", "created_by"]  # fmt: skip
    readonly_fields = ["kind", "target_display", "events", "enabled", "secret_hint",
                       "created_at", "created_by", "recent"]  # fmt: skip
    actions = ["send_test", "disable_selected", "enable_selected", "remove_selected"]

    def get_form(
        self,
        request: HttpRequest,
        obj: NotificationChannel | None = None,
        change: bool = False,
        **kwargs: Any,
    ) -> Any:
        if obj is not None:
            return super().get_form(request, obj, change, **kwargs)
        # Per request: the service records who added the channel.
        return type("ChannelAddFormFor", (ChannelAddForm,), {"user": request.user})

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ["kind", "url", "events"] if obj is None else self.readonly_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [] if obj is None else self.readonly_fields

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False if obj is not None else super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # removal goes through the service (audited): the action below

    def has_remove_permission(self, request: HttpRequest) -> bool:
        codename = get_permission_codename("delete", self.opts)
        return request.user.has_perm(f"{self.opts.app_label}.{codename}")

    def has_test_permission(self, request: HttpRequest) -> bool:
        codename = get_permission_codename("change", self.opts)
        return request.user.has_perm(f"{self.opts.app_label}.{codename}")

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        # The service made it in clean(); the admin's own save must not make it twice.
        form.instance = form.created.channel
        request.kb_created = form.created  # type: ignore[attr-defined]

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        return None

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        return super().log_addition(request, request.kb_created.channel, message)  # type: ignore[attr-defined]

    def response_add(
        self, request: HttpRequest, obj: Any, post_url_continue: Any = None
    ) -> HttpResponse:
        created = request.kb_created  # type: ignore[attr-defined]
        return TemplateResponse(
            request,
            "admin/audit/notificationchannel/created.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "channel": created.channel,
                "signing_secret": created.signing_secret,
                "title": "Alert channel added",
            },
        )

    @admin.display(description="events")
    def events_shown(self, channel: NotificationChannel) -> str:
        return ", ".join(channel.events)

    @admin.display(description="recent deliveries")
    def recent(self, channel: NotificationChannel) -> SafeString:
        rows = channel.deliveries.all()[:10]
        return format_html_join(
            "\n", "<div>{} {}: {} after {} attempt(s) {}</div>",
            ((d.created_at.strftime("%Y-%m-%d %H:%M:%S"), d.event, d.state, d.attempts,
              d.last_error) for d in rows),
        )  # fmt: skip

    @admin.action(description="Send a test alert", permissions=["test"])
    def send_test(self, request: HttpRequest, queryset: QuerySet[NotificationChannel]) -> None:
        for channel in queryset:
            channel_test(channel=channel)
        self.message_user(
            request,
            f"test alert queued to {len(queryset)} channel(s); see the notification deliveries",
            messages.SUCCESS,
        )

    @admin.action(description="Pause selected channels", permissions=["test"])
    def disable_selected(
        self, request: HttpRequest, queryset: QuerySet[NotificationChannel]
    ) -> None:
        self._enable(request, queryset, enabled=False)

    @admin.action(description="Resume selected channels", permissions=["test"])
    def enable_selected(
        self, request: HttpRequest, queryset: QuerySet[NotificationChannel]
    ) -> None:
        self._enable(request, queryset, enabled=True)

    def _enable(
        self, request: HttpRequest, queryset: QuerySet[NotificationChannel], *, enabled: bool
    ) -> None:
        for channel in queryset:
            channel_update(channel=channel, enabled=enabled, by=request.user)
        state = "resumed" if enabled else "paused"
        self.message_user(request, f"{state} {len(queryset)} channel(s)", messages.SUCCESS)

    @admin.action(description="Remove selected channels", permissions=["remove"])
    def remove_selected(
        self, request: HttpRequest, queryset: QuerySet[NotificationChannel]
    ) -> None:
        count = 0
        for channel in queryset:
            channel_remove(channel=channel, by=request.user)
            count += 1
        self.message_user(request, f"removed {count} channel(s)", messages.SUCCESS)


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(HistoryAdmin[NotificationDelivery]):
    """The delivery log: each alert to each channel, with its tries. Never a secret."""

    list_display = ["created_at", "event", "channel", "state", "attempts", "last_error"]
    list_filter = ["state", "event", "channel"]
    list_select_related = ["channel"]
    fields = ("id", "channel", "event", "state", "attempts", "last_error", "created_at",
              "finished_at", "payload")  # fmt: skip
    readonly_fields = fields
    inlines = [AttemptInline]
