"""Admin API tokens (``cka_…``): shown once, stored as a digest, revocable."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from broker.infra.errors import NotFound, ServiceError
from broker.infra.secrets import secret_digest, secret_issue
from broker.models import AdminToken, touch_last_used_row

PREFIX = "cka"


@dataclass(frozen=True)
class IssuedAdminToken:
    token: AdminToken
    plaintext: str


@transaction.atomic
def admintoken_create(*, name: str, username: str) -> IssuedAdminToken:
    name = name.strip()
    if not name or len(name) > 100:
        raise ServiceError("give 1-100 characters", "name")
    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None or not user.is_staff:
        raise ServiceError(f"{username!r} is not an active staff user", "user")
    issued = secret_issue(PREFIX)
    token = AdminToken.objects.create(
        name=name, user=user, digest=issued.digest, display_prefix=issued.display_prefix
    )
    audit_record(action="admintoken.created", by=user, token=token.display_prefix, name=name)
    return IssuedAdminToken(token, issued.plaintext)


def admintoken_authenticate(plaintext: str) -> AbstractBaseUser | None:
    """The user behind a live token, or None; says nothing about why a token failed."""
    token = (
        AdminToken.objects.select_related("user")
        .filter(digest=secret_digest(plaintext), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if token is None:
        return None
    touch_last_used_row(token)
    return token.user


@transaction.atomic
def admintoken_revoke(
    *, token_id: int, by: AbstractBaseUser | AnonymousUser | None = None
) -> AdminToken:
    token = AdminToken.objects.filter(pk=token_id).first()
    if token is None:
        raise NotFound(f"no admin token with id {token_id}")
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(action="admintoken.revoked", by=by, token=token.display_prefix)
    return token
