"""A backend's key pool (issue 15): add, enable, disable, reweigh and remove its keys.

Each change is one transaction that tells every proxy (access_changed) and writes one audit
event naming the key by its fingerprint, never the key. A backend always keeps one enabled
key: the last one can be rotated, not disabled or removed.
"""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.db.models import Max

from audit.services import audit_record
from broker.infra.errors import Conflict, ServiceError
from broker.models import Backend, BackendKey
from broker.services.access import access_changed
from broker.services.backends import (
    User,
    ValidationResult,
    backend_check_new_key,
    backend_check_secret,
    backend_queue_validation,
    backend_record_checked,
    backend_summarize,
)

MAX_WEIGHT = 1000


def key_check_weight(weight: int) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ServiceError(f"must be a whole number from 1 to {MAX_WEIGHT}", "weight")
    return weight


def key_add_check(*, backend: Backend, secret: str, weight: int = 1) -> BackendKey:
    """Every rule of key_add; the key it would save (unsaved)."""
    if backend.client_key or backend.federated:
        how = "the agents' own keys" if backend.client_key else "workload identity"
        raise ServiceError(f"backend {backend.name} uses {how} and stores no keys", "secret")
    key_check_weight(weight)
    scheme, fingerprint = backend_check_secret(kind=backend.kind, secret=secret)
    if BackendKey.objects.filter(backend=backend, fingerprint=fingerprint).exists():
        # The fingerprint names the key in the CLI, the API and the audit trail.
        raise Conflict(f"backend {backend.name} already has a key {fingerprint}", "secret")
    return BackendKey(
        backend=backend,
        secret=secret.strip(),
        fingerprint=fingerprint,
        auth_scheme=scheme,
        weight=weight,
    )


def key_add(
    *,
    backend: Backend,
    secret: str,
    weight: int = 1,
    validate: bool = False,
    allow_invalid: bool = False,
    checked: ValidationResult | None = None,
    by: User = None,
) -> BackendKey:
    """Add a key at the end of the pool; it serves calls at once and is validated (now,
    with ``validate``: ``allow_invalid`` and ``checked`` as for backend_add)."""
    if validate and checked is None:
        key_add_check(backend=backend, secret=secret, weight=weight)
        checked = backend_check_new_key(backend=backend, secret=secret, allow_invalid=allow_invalid)
    return _key_add(backend=backend, secret=secret, weight=weight, checked=checked, by=by)


@transaction.atomic
def _key_add(
    *, backend: Backend, secret: str, weight: int, checked: ValidationResult | None, by: User
) -> BackendKey:
    key = key_add_check(backend=backend, secret=secret, weight=weight)
    last = BackendKey.objects.filter(backend=backend).aggregate(last=Max("position"))["last"]
    key.position = 0 if last is None else last + 1
    try:
        with transaction.atomic():
            key.save()
    except IntegrityError:
        raise Conflict(
            f"backend {backend.name} already has a key {key.fingerprint}", "secret"
        ) from None
    backend_summarize(backend)
    access_changed()
    audit_record(
        action="backend.key_added",
        by=by,
        backend=backend.name,
        fingerprint=key.fingerprint,
        weight=key.weight,
    )
    if checked is not None:
        backend_record_checked(backend, key, checked)
    else:
        backend_queue_validation(backend, key)
    return key


def _others_enabled(key: BackendKey) -> bool:
    return (
        BackendKey.objects.filter(backend_id=key.backend_id, enabled=True)
        .exclude(pk=key.pk)
        .exists()
    )


def _refuse_last(key: BackendKey, doing: str) -> None:
    if key.enabled and not _others_enabled(key):
        raise Conflict(
            f"{key.fingerprint} is the last enabled key of backend {key.backend.name}; "
            f"add or enable another before you {doing} it (or rotate it)",
            "fingerprint",
        )


def key_update_check(
    *, key: BackendKey, enabled: bool | None = None, weight: int | None = None
) -> None:
    if weight is not None:
        key_check_weight(weight)
    if enabled is False:
        _refuse_last(key, "disable")


@transaction.atomic
def key_update(
    *, key: BackendKey, enabled: bool | None = None, weight: int | None = None, by: User = None
) -> BackendKey:
    """Enable, disable or reweigh a key; a change reaches every proxy on its next call."""
    # Two admins disabling the pool's last two keys at once: one of them is refused.
    Backend.objects.select_for_update().filter(pk=key.backend_id).first()
    key_update_check(key=key, enabled=enabled, weight=weight)
    toggled = enabled is not None and enabled != key.enabled
    reweighed = weight is not None and weight != key.weight
    if not (toggled or reweighed):
        return key
    if enabled is not None:
        key.enabled = enabled
    if weight is not None:
        key.weight = weight
    key.save()
    backend_summarize(key.backend)
    access_changed()
    if toggled:
        action = "backend.key_enabled" if key.enabled else "backend.key_disabled"
    else:
        action = "backend.key_updated"
    audit_record(
        action=action,
        by=by,
        backend=key.backend.name,
        fingerprint=key.fingerprint,
        weight=key.weight,
    )
    if toggled and key.enabled:
        backend_queue_validation(key.backend, key)
    return key


def key_disable(*, key: BackendKey, by: User = None) -> BackendKey:
    return key_update(key=key, enabled=False, by=by)


def key_enable(*, key: BackendKey, by: User = None) -> BackendKey:
    return key_update(key=key, enabled=True, by=by)


@transaction.atomic
def key_remove(*, key: BackendKey, by: User = None) -> None:
    """Remove a key from the pool; refused for its last enabled key."""
    Backend.objects.select_for_update().filter(pk=key.backend_id).first()
    _refuse_last(key, "remove")
    backend, fingerprint = key.backend, key.fingerprint
    key.delete()
    backend_summarize(backend)
    access_changed()
    audit_record(action="backend.key_removed", by=by, backend=backend.name, fingerprint=fingerprint)
