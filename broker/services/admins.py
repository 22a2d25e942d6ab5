from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction


@dataclass(frozen=True)
class FirstAdmin:
    user: AbstractBaseUser
    created: bool
    generated_password: str | None


@transaction.atomic
def admin_ensure_first(*, username: str, password: str = "") -> FirstAdmin:
    """Create the first superuser unless one exists.

    Without a password one is generated; it is returned once for the caller to show and is
    kept nowhere else.
    """
    user_model = get_user_model()
    existing = user_model.objects.filter(is_superuser=True).order_by("pk").first()
    if existing is not None:
        return FirstAdmin(existing, created=False, generated_password=None)
    generated = None if password else secrets.token_urlsafe(18)
    user = user_model.objects.create_superuser(username=username, password=password or generated)
    return FirstAdmin(user, created=True, generated_password=generated)
