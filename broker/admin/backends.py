"""The admin for backends: forms run the services' checks, saves and deletes call them."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import URLPattern, path
from django.utils.html import format_html
from django.utils.safestring import SafeString

from broker.admin.forms import service_checked

if TYPE_CHECKING:
    from django.contrib.admin.options import _FieldOpts, _FieldsetSpec
    from django.utils.functional import _StrOrPromise
from broker.admin.widgets import acted_on, may, post_only
from broker.infra.errors import ServiceError
from broker.kinds import PROVIDERS
from broker.models import Backend, BackendKey, ValidationState
from broker.selectors.backend_keys import KeyHealth, keys_health, keys_of
from broker.services.backend_keys import (
    key_add,
    key_add_check,
    key_disable,
    key_enable,
    key_remove,
)
from broker.services.backends import (
    FederationSettings,
    TtlBounds,
    ValidationResult,
    backend_add,
    backend_add_check,
    backend_check_new_key,
    backend_check_outcome,
    backend_clean_base_url,
    backend_remove,
    backend_remove_refusal,
    backend_rotate,
    backend_rotate_check,
    backend_update,
    backend_update_check,
    backend_validate,
)

FEDERATION_FORM_FIELDS = (
    "federation_rule_id",
    "organization_id",
    "service_account_id",
    "workspace_id",
    "federation_audience",
)
FEDERATION_HELP = {
    "federation_rule_id": "Workload identity (kind anthropic-wif) only: fdrl_… from the Claude "
    "Console. keybroker exchanges its own JWT for an access token; no key is stored.",
    "organization_id": "Workload identity only: your organization's UUID.",
    "service_account_id": "Workload identity only, optional: svac_….",
    "workspace_id": "Workload identity only, optional: wrkspc_… or default.",
    "federation_audience": "Workload identity only: aud of keybroker's JWT "
    "(blank: https://api.anthropic.com).",
}

# The services' names for the form's inputs, where they differ. The TTL bounds are one rule
# (min <= default <= max); its message goes on the first of them.
SERVICE_FIELDS = {
    "secret": "new_secret",
    "fingerprint": "rotate_fingerprint",
    "audience": "federation_audience",
    "federation": "federation_rule_id",
    "ttl": "token_ttl_min",
}

TTL_FIELDS = ("token_ttl_min", "token_ttl_default", "token_ttl_max")
VALIDATION_FIELDS = (
    "status", "validation_message", "validation_checked_at", "secret_fingerprint",
    "auth_scheme", "created_at", "rotated_at",
)  # fmt: skip
FEDERATION_FIELDSET: tuple[str, _FieldOpts] = (
    "Workload identity (kind anthropic-wif)",
    {
        "fields": FEDERATION_FORM_FIELDS,
        "classes": ["kb-federation"],
        "description": "keybroker exchanges its own JWT for short-lived access tokens; no "
        "key is stored (docs/workload-identity.md).",
    },
)
TOKENS_FIELDSET: tuple[str, _FieldOpts] = (
    "Tokens agents mint",
    {"fields": (*TTL_FIELDS, "enabled")},
)

STATE_COLOURS = {
    ValidationState.VALID: "#1a7f37",
    ValidationState.INVALID: "#cf222e",
    ValidationState.UNREACHABLE: "#bf8700",
    ValidationState.UNKNOWN: "#6e7781",
}


class BackendForm(forms.ModelForm[Backend]):
    # What a name may be (1-63 characters among them) is backend_clean_name's rule and words.
    name = forms.CharField(max_length=255)
    kind = forms.ChoiceField(choices=[(k, p.label) for k, p in PROVIDERS.items()])
    base_url = forms.CharField(
        required=False,
        help_text="Leave blank for the provider's default (https://api.anthropic.com).",
    )
    # Never pre-filled; on the change form blank means "keep the current secret".
    new_secret = forms.CharField(
        label="Secret",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="sk-ant-api… or sk-ant-oat…. Write-only: it is never shown again.",
    )
    # The change page only: which key of the pool the Secret replaces (backend rotate
    # --fingerprint), and another key for the pool (issue 15).
    rotate_fingerprint = forms.ChoiceField(
        label="Key it replaces",
        required=False,
        help_text="The key of the pool a new Secret replaces (its place and weight stay); "
        "with one key, that one.",
    )
    add_key = forms.CharField(
        label="Add a key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Another sk-ant-… key for this backend's pool: calls are spread over the "
        "enabled keys by weight, and one that is rate limited is skipped while it cools down.",
    )
    add_key_weight = forms.IntegerField(
        label="Its weight", required=False, min_value=1, initial=1, help_text="share of calls"
    )
    # A key entered here is checked against the upstream before it is saved (as `backend
    # add` and `rotate` do): one the upstream refuses is not saved unless this is ticked.
    allow_invalid = forms.BooleanField(
        label="Save even if the upstream refuses the key",
        required=False,
        help_text="A key is checked against the upstream before it is saved; one it refuses "
        "is not saved unless this is ticked. An upstream that cannot be reached does not stop "
        "the save: the key is checked again by the scheduled validation.",
    )
    # What the upstream said about each key entered, asked once in clean() and stored with
    # the key by save_model.
    key_checks: dict[str, ValidationResult]

    class Meta:
        model = Backend
        fields = [
            "name",
            "kind",
            "base_url",
            "token_ttl_min",
            "token_ttl_default",
            "token_ttl_max",
            "enabled",
            "client_key",
            *FEDERATION_FORM_FIELDS,
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_checks = {}
        if self.instance.pk:
            self.fields["new_secret"].help_text = (
                "Leave blank to keep the keys as they are; a new one replaces the key chosen "
                "below, validated like an added key."
            )
            fingerprints = [key.fingerprint for key in keys_of(self.instance)]
            only = len(fingerprints) == 1
            choosing = self.fields["rotate_fingerprint"]
            assert isinstance(choosing, forms.ChoiceField)
            choosing.choices = [
                ("", "the only key" if only else "(choose the key to replace)"),
                *[(fingerprint, fingerprint) for fingerprint in fingerprints],
            ]
        for name, text in FEDERATION_HELP.items():
            if name in self.fields:  # read-only on a keyed backend's page
                self.fields[name].help_text = text

    def ttl(self) -> TtlBounds | None:
        """The token TTL bounds as the service takes them; None while one is not a number
        (the form already says so on that field)."""
        data = self.cleaned_data
        minimum, maximum, default = (
            data.get(name) for name in ("token_ttl_min", "token_ttl_max", "token_ttl_default")
        )
        if minimum is None or maximum is None or default is None:
            return None
        return TtlBounds(minimum, maximum, default)

    def federation(self) -> FederationSettings:
        """The workload identity fields as the service takes them. On a workload identity
        backend a blank field is given as blank (the service says which must be set); on any
        other backend a blank one is not given at all."""
        data = self.cleaned_data
        kind = self.instance.kind if self.instance.pk else data.get("kind", "")
        federated = kind in PROVIDERS and PROVIDERS[kind].federated
        values = {
            "federation_rule_id": data.get("federation_rule_id"),
            "organization_id": data.get("organization_id"),
            "service_account_id": data.get("service_account_id"),
            "workspace_id": data.get("workspace_id"),
            "audience": data.get("federation_audience"),
        }
        if federated:
            return FederationSettings(**{name: value or "" for name, value in values.items()})
        return FederationSettings(**{name: value or None for name, value in values.items()})

    def rotated_fingerprint(self) -> str | None:
        """The key a new Secret replaces; None: the only one (the service refuses to guess
        when there are several)."""
        return self.cleaned_data.get("rotate_fingerprint") or None

    def check_key(self, field: str, candidate: Backend, secret: str) -> None:
        """Ask the upstream about a key typed into ``field`` (only once the rest of the form
        is right); a refusal goes on that field."""
        if self.errors:
            return
        with service_checked(self, {"secret": field}):
            self.key_checks[field] = backend_check_new_key(
                backend=candidate,
                secret=secret,
                allow_invalid=bool(self.cleaned_data.get("allow_invalid")),
            )
        if field in self.errors:
            self.add_error(
                field, "Tick “Save even if the upstream refuses the key” to save it anyway."
            )

    def validate_unique(self) -> None:
        """A name that is taken is the service's refusal (backend_add_check), in its words."""

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        # The services' own checks, so a mistake shows on its field in the words the CLI and
        # the REST API use, and nothing is saved.
        secret = data.get("new_secret") or ""
        if not self.instance.pk:
            candidate = None
            with service_checked(self, SERVICE_FIELDS):
                candidate = backend_add_check(
                    name=data.get("name") or "",
                    kind=data.get("kind") or "",
                    secret=secret,
                    client_key=bool(data.get("client_key")),
                    base_url=data.get("base_url") or None,
                    ttl=self.ttl(),
                    federation=self.federation(),
                )
            if candidate is not None and secret:
                self.check_key("new_secret", candidate, secret)
            return data
        backend = self.instance
        if data.get("add_key"):
            with service_checked(self, {"secret": "add_key", "weight": "add_key_weight"}):
                key_add_check(
                    backend=backend,
                    secret=data["add_key"],
                    weight=data.get("add_key_weight") or 1,
                )
        if secret:  # a new key rotates the backend to it first
            with service_checked(self, SERVICE_FIELDS):
                backend_rotate_check(
                    backend=backend, secret=secret, fingerprint=self.rotated_fingerprint()
                )
        with service_checked(self, SERVICE_FIELDS):
            backend_update_check(
                backend=backend,
                base_url=data.get("base_url") or None,
                ttl=self.ttl(),
                federation=self.federation() if backend.federated else None,
                key_entered=bool(secret),
            )
        if (secret or data.get("add_key")) and not self.errors:
            # Against the base URL the backend moves to, if it moves: the keys go there.
            moved = copy.copy(backend)
            moved.base_url = backend_clean_base_url(data.get("base_url") or backend.base_url)
            if secret:
                self.check_key("new_secret", moved, secret)
            if data.get("add_key"):
                self.check_key("add_key", moved, data["add_key"])
        return data


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin[Backend]):
    form = BackendForm
    list_display = [
        "name",
        "kind",
        "status",
        "secret_fingerprint",
        "validation_checked_at",
        "enabled",
    ]
    list_filter = ["validation_state", "kind", "enabled"]
    search_fields = ["name"]
    actions = ["validate_now", "delete_selected"]
    readonly_fields = [*VALIDATION_FIELDS, "key_pool"]

    def get_fieldsets(self, request: HttpRequest, obj: Backend | None = None) -> _FieldsetSpec:
        """Only what applies to this backend (issue 20, item 6): the add form shows the key
        or, for kind anthropic-wif, the workload identity settings (the page's script
        switches them with the kind); a change page, its key pool or its federation."""
        if obj is None:
            return [
                (None, {"fields": ("name", "kind", "base_url", "client_key", "new_secret",
                                   "allow_invalid")}),
                FEDERATION_FIELDSET,
                TOKENS_FIELDSET,
            ]  # fmt: skip
        first: list[tuple[str | None, _FieldOpts]] = [
            (None, {"fields": ("name", "kind", "base_url", "client_key")})
        ]
        if obj.federated:
            first.append(FEDERATION_FIELDSET)
        elif not obj.client_key:
            first.append(
                (
                    "Keys",
                    {
                        "fields": ("key_pool", "new_secret", "rotate_fingerprint",
                                   "allow_invalid", "add_key", "add_key_weight"),
                    },
                )
            )  # fmt: skip
        return [*first, TOKENS_FIELDSET, ("Validation", {"fields": VALIDATION_FIELDS})]

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Backend | None = None,
    ) -> HttpResponse:
        # The kinds whose add form shows the workload identity settings instead of a key.
        context["kb_federated_kinds"] = [k for k, p in PROVIDERS.items() if p.federated]
        return super().render_change_form(request, context, add, change, form_url, obj)

    @admin.display(description="keys")
    def key_pool(self, backend: Backend) -> SafeString:
        """The pool: each key's fingerprint, state, weight and health, with its actions
        (buttons that post this page's form to key_action: no key ever reaches the page)."""
        keys = keys_of(backend)
        if not keys:
            return format_html("{}", "no stored keys")
        health = keys_health(backend, keys)
        rows = [
            format_html(
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
                "<td>{}</td></tr>",
                key.fingerprint,
                key.validation_state,
                key.weight,
                "enabled" if key.enabled else "disabled",
                health.get(key.pk, KeyHealth("ok")).describe(),
                format_html(
                    '<button type="submit" class="button" formaction="keys/{}/{}/">{}</button> '
                    '<button type="submit" class="button" formaction="keys/{}/remove/">'
                    "remove</button> "
                    '<button type="submit" class="button" formaction="keys/{}/validate/">'
                    "validate</button>",
                    key.pk,
                    "disable" if key.enabled else "enable",
                    "disable" if key.enabled else "enable",
                    key.pk,
                    key.pk,
                ),
            )
            for key in keys
        ]
        header = format_html(
            "<tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th></th></tr>",
            "fingerprint",
            "state",
            "weight",
            "enabled",
            "health",
        )
        return format_html('<table class="kb-keys">{}{}</table>', header, SafeString("".join(rows)))

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<path:object_id>/change/keys/<int:key_id>/<str:action>/",
                post_only(self.admin_site, self.key_action),
                name="broker_backend_key_action",
            )
        ]
        return own + super().get_urls()

    def key_action(
        self, request: HttpRequest, object_id: str, key_id: int, action: str
    ) -> HttpResponse:
        """Enable, disable, remove or validate one key of the pool, through its service."""
        backend = acted_on(self, request, object_id, allowed=may(request, "change", Backend))
        change_page = HttpResponseRedirect("../../../")
        key = BackendKey.objects.filter(pk=key_id, backend=backend).first()
        if key is not None and action == "validate":
            backend_validate(backend=backend, key=key)
            key.refresh_from_db()
            level = (
                messages.SUCCESS
                if key.validation_state == ValidationState.VALID
                else (messages.WARNING)
            )
            self.message_user(
                request,
                f"key {key.fingerprint}: {key.validation_state} ({key.validation_message})",
                level,
            )
            return change_page
        do = {"enable": key_enable, "disable": key_disable, "remove": key_remove}.get(action)
        if key is None or do is None:
            return change_page
        try:
            do(key=key, by=request.user)
        except ServiceError as exc:
            self.message_user(request, f"{exc.message}. Nothing was changed.", messages.ERROR)
        else:
            done = {"enable": "enabled", "disable": "disabled", "remove": "removed"}[action]
            self.message_user(request, f"key {key.fingerprint} {done}", messages.SUCCESS)
        return change_page

    def get_readonly_fields(
        self, request: HttpRequest, obj: Backend | None = None
    ) -> list[str] | tuple[str, ...]:
        # A backend's name is in every agent's base_url and its kind fixes the secret format;
        # whether keys are stored or brought by agents is part of what agents were told.
        if obj is None:
            return self.readonly_fields
        readonly = [*self.readonly_fields, "name", "kind", "client_key"]
        if not obj.federated:
            readonly += FEDERATION_FORM_FIELDS  # shown empty; nothing to set on a keyed backend
        return readonly

    @admin.display(description="status", ordering="validation_state")
    def status(self, backend: Backend) -> SafeString:
        colour = STATE_COLOURS.get(ValidationState(backend.validation_state), "#6e7781")
        return format_html(
            '<span class="kb-status kb-status-{}" style="color:#fff;background:{};padding:2px 8px;'
            'border-radius:10px" title="{}">{}</span>',
            backend.validation_state,
            colour,
            backend.validation_message,
            backend.validation_state,
        )

    def save_model(
        self, request: HttpRequest, obj: Backend, form: BackendForm, change: bool
    ) -> None:
        data = form.cleaned_data
        ttl = TtlBounds(data["token_ttl_min"], data["token_ttl_max"], data["token_ttl_default"])
        if not change:
            created = backend_add(
                name=data["name"],
                kind=data["kind"],
                secret=data["new_secret"],
                client_key=data["client_key"],
                base_url=data.get("base_url") or None,
                ttl=ttl,
                federation=form.federation() if PROVIDERS[data["kind"]].federated else None,
                validate=True,
                checked=form.key_checks.get("new_secret"),
                by=request.user,
            )
            obj.pk = created.pk
            self._tell_checked(request, created, form.key_checks.get("new_secret"))
            return
        current = Backend.objects.get(pk=obj.pk)
        if data.get("add_key"):
            key_add(
                backend=current,
                secret=data["add_key"],
                weight=data.get("add_key_weight") or 1,
                checked=form.key_checks.get("add_key"),
                by=request.user,
            )
            self._tell_checked(request, current, form.key_checks.get("add_key"))
        secret = data.get("new_secret") or None
        if secret:
            # First, so that the key entered is the one a move to a new host sends there.
            backend_rotate(
                backend=current,
                secret=secret,
                fingerprint=form.rotated_fingerprint(),
                checked=form.key_checks.get("new_secret"),
                by=request.user,
            )
            self._tell_checked(request, current, form.key_checks.get("new_secret"))
        backend_update(
            backend=current,
            base_url=data.get("base_url") or None,
            ttl=ttl,
            enabled=data["enabled"],
            federation=form.federation() if current.federated else None,
            secret=secret,
            by=request.user,
        )

    def _tell_checked(
        self, request: HttpRequest, backend: Backend, result: ValidationResult | None
    ) -> None:
        """What the check of a key entered found, in place of Django's green "added
        successfully" when the key is not known to work."""
        if result is None:
            return
        valid = result.state == ValidationState.VALID
        if not valid:
            request._kb_key_not_valid = True  # type: ignore[attr-defined]
        self.message_user(
            request,
            f"backend {backend.name}: {backend_check_outcome(backend, result)}",
            messages.SUCCESS if valid else messages.WARNING,
        )

    def message_user(
        self,
        request: HttpRequest,
        message: _StrOrPromise,
        level: int | str = messages.INFO,
        extra_tags: str = "",
        fail_silently: bool = False,
    ) -> None:
        if level == messages.SUCCESS and getattr(request, "_kb_key_not_valid", False):
            # Django's "was added/changed successfully" would read as "the key works".
            level = messages.INFO
        super().message_user(request, message, level, extra_tags, fail_silently)

    @admin.action(description="Validate now against the upstream", permissions=["change"])
    def validate_now(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        for backend in queryset:
            result = backend_validate(backend=backend)
            level = messages.SUCCESS if result.state == ValidationState.VALID else messages.WARNING
            self.message_user(
                request, f"backend {backend.name}: {result.state} ({result.message})", level
            )

    # Removing a backend here is backend_remove, as from the CLI and the API: its refusal
    # while tokens are live, their revocation, the proxy told at once, the audit event.
    # Django's delete page and "Delete selected" stay; only what they do changes.

    def get_deleted_objects(
        self, objs: Sequence[Backend] | QuerySet[Backend], request: HttpRequest
    ) -> tuple[list[Any], dict[Any, Any], set[Any], list[Any]]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        if self.has_delete_permission(request):
            # Grants and token history go with their backend: backend_remove's rule, not
            # each model admin's (token rows are never deleted on their own).
            perms_needed = set()
        refusals = [r for backend in objs if (r := backend_remove_refusal(backend=backend))]
        return deleted, counts, perms_needed, [*protected, *refusals]

    def delete_model(self, request: HttpRequest, obj: Backend) -> None:
        backend_remove(backend=obj, by=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        with transaction.atomic():
            for backend in queryset:
                backend_remove(backend=backend, by=request.user)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        try:
            return super().delete_view(request, object_id, extra_context)
        except ServiceError as exc:  # tokens minted between the page and the click
            self.message_user(request, f"{exc.message}. Nothing was removed.", messages.ERROR)
            return HttpResponseRedirect(request.path)

    @admin.action(description="Delete selected backends", permissions=["delete"])
    def delete_selected(
        self, request: HttpRequest, queryset: QuerySet[Backend]
    ) -> HttpResponse | None:
        try:
            with transaction.atomic():  # all of them, or (refused) none
                response: HttpResponse | None = django_delete_selected(self, request, queryset)
                return response
        except ServiceError as exc:
            self.message_user(request, f"{exc.message}. Nothing was removed.", messages.ERROR)
            return None
