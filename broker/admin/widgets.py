"""What the admin pages share: status pills, permission checks and POST-only buttons."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db.models import Model
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import SafeString
from django.views.decorators.http import require_POST

from broker.models import Token, TokenState

TOKEN_STATE_COLOURS = {
    TokenState.LIVE: "#1a7f37",
    TokenState.EXPIRED: "#6e7781",
    TokenState.REVOKED: "#cf222e",
}

View = Callable[..., HttpResponse]
M = TypeVar("M", bound=Model)


def badge(kind: str, value: str, colour: str, title: str = "") -> SafeString:
    """A coloured pill; the same as BackendAdmin's kb-status, so states look alike."""
    return format_html(
        '<span class="kb-{0}-status kb-{0}-status-{1}" style="color:#fff;background:{2};'
        'padding:2px 8px;border-radius:10px" title="{3}">{1}</span>',
        kind,
        value,
        colour,
        title,
    )


def cut(text: str, *, width_em: int = 14) -> SafeString:
    """``text`` on one line, cut to ``width_em`` with an ellipsis; the whole in its title
    (lists stay one line a row at a laptop's width; issue 20, item 6)."""
    return format_html(
        '<span class="kb-cut" style="max-width:{}em" title="{}">{}</span>', width_em, text, text
    )


def token_badge(token: Token, now: datetime | None = None) -> SafeString:
    state = token.state(now)
    return badge("token", state, TOKEN_STATE_COLOURS[state])


def may(request: HttpRequest, action: str, model: type[Model]) -> bool:
    """Whether the user holds Django's ``action`` permission on ``model``."""
    opts = model._meta
    return request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")


def acted_on(
    model_admin: admin.ModelAdmin[M], request: HttpRequest, object_id: str, *, allowed: bool
) -> M:
    """The object a button on its page acts on: 403 unless ``allowed``, 404 if it is gone."""
    if not allowed:
        raise PermissionDenied
    found = model_admin.get_object(request, unquote(object_id))
    if found is None:
        raise Http404(f"no such {model_admin.opts.verbose_name}")
    return found


def back(request: HttpRequest, default: str) -> HttpResponseRedirect:
    """Back to the page the button was on (kept in ``next``), if it is one of ours."""
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = default
    return HttpResponseRedirect(target)


def post_only(site: admin.AdminSite, view: View) -> View:
    """An admin view that only answers POST."""
    # A decision changes state, so a GET (a prefetching browser, a pasted link) must not.
    return site.admin_view(require_POST(view))
