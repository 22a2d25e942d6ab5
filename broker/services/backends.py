"""Backends: add, rotate, validate and remove upstream credentials."""

from __future__ import annotations

import copy
import hmac
import logging
import re
import uuid
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
from celery import signature
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from audit.services import audit_record
from broker.infra.errors import Conflict, NotFound, NotPermitted, Problems, ServiceError
from broker.kinds import DEFAULT_KIND, Provider, ProviderError, provider_for
from broker.models import Backend, BackendKey, ValidationState, name_validator
from broker.services.access import access_changed
from broker.services.federation import (
    FederationError,
    federation_forget,
    federation_of,
    federation_token,
)
from keybroker.wire import SECRET_PATTERN, is_loopback_host, redact

logger = logging.getLogger(__name__)

User = AbstractBaseUser | AnonymousUser | None
MAX_TTL_SECONDS = 24 * 3600


def backend_clean_base_url(raw: str) -> str:
    """An upstream base URL: https, or http only on loopback (local fakes and tests)."""
    try:
        parts = urlsplit(raw.strip())
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ServiceError("not a valid URL", "base_url") from None
    if parts.scheme not in {"http", "https"} or not host:
        raise ServiceError("must be an https:// URL such as https://api.anthropic.com", "base_url")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ServiceError("must use https:// (plain http is allowed only on loopback)", "base_url")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ServiceError("must not carry credentials, a query or a fragment", "base_url")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or _default_port(parts.scheme)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


ALLOWED_HOSTS_SETTING = "KEYBROKER_ALLOWED_UPSTREAM_HOSTS"


def backend_host_allowed(*, kind: str, base_url: str) -> str | None:
    """Why a backend of ``kind`` may be moved to ``base_url`` without its key: it is the
    provider's own host, or the operator listed it; None when neither."""
    scheme, host, port = _origin(base_url)
    if (scheme, host, port) == _origin(backend_check_kind(kind).default_base_url):
        return "provider"
    for entry in settings.ALLOWED_UPSTREAM_HOSTS:
        allowed = urlsplit(f"//{entry}")
        if allowed.hostname == host and (allowed.port or _default_port(scheme)) == port:
            return ALLOWED_HOSTS_SETTING
    return None


def backend_check_move(*, backend: Backend, base_url: str, key_entered: bool) -> str | None:
    """May ``backend`` (as stored) move to ``base_url`` (clean)? The one rule for the REST
    API, the admin form and any other caller.

    Whatever a backend sends upstream (its key, the agents' own keys, keybroker's signed
    identity tokens) goes to its base URL, so a new host (scheme, host and port) is allowed
    only when the key was entered with this change (who has the key may send it anywhere)
    or the host is the provider's own or listed in KEYBROKER_ALLOWED_UPSTREAM_HOSTS. Returns
    how a new host was allowed (for the audit trail), None when the host stays; raises
    NotPermitted otherwise. A new path on the same host is no new host.
    """
    if _origin(base_url) == _origin(backend.base_url):
        return None
    allowed = backend_host_allowed(kind=backend.kind, base_url=base_url)
    if allowed:
        return allowed
    host = urlsplit(base_url).netloc
    if backend.client_key or backend.federated:
        sends = "the agents' own keys" if backend.client_key else "keybroker's identity tokens"
        raise NotPermitted(
            f"{host} is a new host for backend {backend.name}, which would send {sends} "
            f"there; it stores no key to enter again, so add the host to "
            f"{ALLOWED_HOSTS_SETTING} first",
            "base_url",
        )
    if key_entered:
        return "key"
    raise NotPermitted(
        f"{host} is a new host for backend {backend.name}, and its key would be sent there: "
        "enter the key again with this change (only who has the key may send it elsewhere), "
        f"or add the host to {ALLOWED_HOSTS_SETTING}",
        "base_url",
    )


def _check_entered_secret(backend: Backend, secret: str) -> None:
    """The stored key, entered again; a different one changes nothing (rotate to replace)."""
    if backend.client_key or backend.federated:
        raise ServiceError(
            f"backend {backend.name} stores no key; leave it out (a new host for it must be "
            f"in {ALLOWED_HOSTS_SETTING})",
            "secret",
        )
    entered = secret.strip().encode()
    if not any(hmac.compare_digest(entered, key.secret.encode()) for key in backend.keys.all()):
        raise NotPermitted(
            f"does not match the key of backend {backend.name}; nothing was changed (to "
            "replace the key, rotate it)",
            "secret",
        )


def backend_clean_name(name: str) -> str:
    try:
        name_validator(name)
    except ValidationError as exc:
        raise ServiceError(exc.messages[0], "name") from None
    return name


@dataclass(frozen=True)
class TtlBounds:
    minimum: int = 60
    maximum: int = 3600
    default: int = 600

    def check(self) -> None:
        if not 1 <= self.minimum <= self.default <= self.maximum <= MAX_TTL_SECONDS:
            raise ServiceError(
                "token TTL bounds must satisfy 1s <= min <= default <= max <= 24h "
                f"(got min {self.minimum}s, default {self.default}s, max {self.maximum}s)",
                "ttl",
            )


def backend_check_kind(kind: str) -> Provider:
    try:
        return provider_for(kind)
    except ProviderError as exc:
        raise ServiceError(str(exc), "kind") from None


def backend_check_secret(*, kind: str, secret: str) -> tuple[str, str]:
    """The (auth scheme, fingerprint) of a well-formed secret; ServiceError otherwise."""
    provider = backend_check_kind(kind)
    secret = secret.strip()
    if not secret:
        raise ServiceError("must not be empty", "secret")
    try:
        return provider.auth_scheme(secret).name, provider.fingerprint(secret)
    except ProviderError as exc:
        raise ServiceError(str(exc), "secret") from None


@dataclass(frozen=True)
class PendingKey:
    """A checked secret on its way into a backend's pool (saved with the backend)."""

    secret: str = field(repr=False)
    scheme: str
    fingerprint: str


def _apply_secret(backend: Backend, secret: str) -> None:
    scheme, fingerprint = backend_check_secret(kind=backend.kind, secret=secret)
    backend._pending_key = PendingKey(secret.strip(), scheme, fingerprint)  # type: ignore[attr-defined]
    backend.secret_fingerprint = fingerprint
    backend.auth_scheme = scheme
    backend.validation_state = ValidationState.UNKNOWN
    backend.validation_message = ""
    backend.validation_checked_at = None


# broker/tasks.py registers the task under this name. The service names it rather than
# importing the task, which imports the service (no import cycle).
VALIDATE_TASK = "broker.tasks.backend_validate_task"


def backend_queue_validation(backend: Backend, key: BackendKey | None = None) -> None:
    """Validate the backend's keys (or only ``key``) once this transaction commits."""
    args = (backend.pk,) if key is None else (backend.pk, key.pk)
    transaction.on_commit(lambda: signature(VALIDATE_TASK, args=args).delay())


CLIENT_KEY_FINGERPRINT = "(the agent's own key)"
FEDERATION_FINGERPRINT = "(workload identity)"

# Anthropic's tagged ids: a prefix, then letters, digits, dashes and underscores.
_TAGGED_ID = r"[A-Za-z0-9_-]{1,90}"
_FEDERATION_ID_PATTERNS = {
    "federation_rule_id": re.compile(rf"^fdrl_{_TAGGED_ID}$"),
    "service_account_id": re.compile(rf"^svac_{_TAGGED_ID}$"),
    "workspace_id": re.compile(rf"^(?:wrkspc_{_TAGGED_ID}|default)$"),
}
_FEDERATION_ID_EXAMPLES = {
    "federation_rule_id": "fdrl_…",
    "service_account_id": "svac_…",
    "workspace_id": "wrkspc_… or default",
}


@dataclass(frozen=True)
class FederationSettings:
    """What a workload identity backend exchanges with: ids from the Anthropic console.

    ``None`` means "not given" (keep the current value when updating); ``""`` clears an
    optional one. Identifiers, not secrets.
    """

    federation_rule_id: str | None = None
    organization_id: str | None = None
    service_account_id: str | None = None
    workspace_id: str | None = None
    audience: str | None = None

    def given(self) -> dict[str, str]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}


FEDERATION_FIELDS = tuple(f.name for f in fields(FederationSettings))


def backend_clean_federation(settings_: FederationSettings) -> FederationSettings:
    """The settings with each given value checked and trimmed; every problem named at once,
    each on its field."""
    problems = Problems()
    cleaned: dict[str, str] = {}
    for name, raw in settings_.given().items():
        value = raw.strip()
        cleaned[name] = value
        if not value:
            continue
        if SECRET_PATTERN.search(value):
            problems.add("must not look like a credential", name)
        elif name == "organization_id":
            try:
                cleaned[name] = str(uuid.UUID(value))
            except ValueError:
                problems.add(
                    "must be your organization's UUID (Claude Console, Settings > Organization)",
                    name,
                )
        elif name == "audience":
            if len(value) > 255 or any(c.isspace() or not c.isprintable() for c in value):
                problems.add("at most 255 characters, no spaces", name)
        elif not _FEDERATION_ID_PATTERNS[name].match(value):
            problems.add(f"expected {_FEDERATION_ID_EXAMPLES[name]}", name)
    problems.raise_if_any()
    return replace(settings_, **cleaned)


def _apply_federation(backend: Backend, settings_: FederationSettings) -> dict[str, str]:
    """Set the given values on ``backend``; returns what changed. Required ones must end up
    set, so a backend can never be left half-configured."""
    columns = {
        "federation_rule_id": "federation_rule_id",
        "organization_id": "organization_id",
        "service_account_id": "service_account_id",
        "workspace_id": "workspace_id",
        "audience": "federation_audience",
    }
    problems = Problems()
    given: dict[str, str] = {}
    with problems.check():
        given = backend_clean_federation(settings_).given()
    changed = {}
    for name, value in given.items():
        if name == "audience" and not value:
            value = provider_for(backend.kind).default_audience
        if getattr(backend, columns[name]) != value:
            setattr(backend, columns[name], value)
            changed[name] = value
    entered = {name: value.strip() for name, value in settings_.given().items()}
    for name in ("federation_rule_id", "organization_id"):
        # As entered when another value was refused (nothing was set), else as now set.
        present = entered.get(name) if problems and name in entered else getattr(backend, name)
        if not present and name not in problems.fields():
            problems.add(f"required for an {backend.kind} backend", name)
    problems.raise_if_any()
    if not backend.federation_audience:
        backend.federation_audience = provider_for(backend.kind).default_audience
    backend.secret_fingerprint = f"{backend.federation_rule_id} {FEDERATION_FINGERPRINT}"[:64]
    backend.auth_scheme = provider_for(backend.kind).auth_scheme("").name
    return changed


def backend_stores_secret(*, kind: str, client_key: bool = False) -> bool:
    """Whether adding a backend of this kind asks for a secret (the CLI prompts for it)."""
    return not client_key and not backend_check_kind(kind).federated


def backend_add_check(
    *,
    name: str,
    secret: str = "",
    client_key: bool = False,
    kind: str = DEFAULT_KIND,
    base_url: str | None = None,
    ttl: TtlBounds | None = None,
    federation: FederationSettings | None = None,
) -> Backend:
    """Every rule of backend_add, every problem named at once, each on its field; the
    backend it would save (unsaved). The admin form runs it too: one rule, one message."""
    problems = Problems()
    provider: Provider | None = None
    with problems.check():
        provider = backend_check_kind(kind)
    ttl = ttl or TtlBounds()
    with problems.check():
        ttl.check()
    clean_name = None
    with problems.check():
        clean_name = backend_clean_name(name)
    backend = Backend(
        name=clean_name or name,
        kind=kind,
        token_ttl_min=ttl.minimum,
        token_ttl_max=ttl.maximum,
        token_ttl_default=ttl.default,
        client_key=client_key,
    )
    if provider is not None or base_url:
        with problems.check():
            default_url = provider.default_base_url if provider else ""
            backend.base_url = backend_clean_base_url(base_url or default_url)
    if provider is not None and provider.federated:
        # No secret exists to store: the access token comes from exchanging our own JWT.
        if secret.strip():
            problems.add(f"an {kind} backend stores no secret; leave it out", "secret")
        if client_key:
            problems.add(f"an {kind} backend uses workload identity instead", "client_key")
        with problems.check():
            _apply_federation(backend, federation or FederationSettings())
    elif provider is not None:
        if federation is not None and federation.given():
            problems.add(
                f"only an anthropic-wif backend takes them (this one is {kind})", "federation"
            )
        if client_key and provider.dialect != "anthropic":
            # The agent's own key comes in X-Anthropic-Key (docs/providers.md).
            problems.add(f"an {kind} backend cannot use the agents' own keys yet", "client_key")
        elif client_key:
            if secret.strip():
                problems.add("a client-key backend stores no secret; leave it out", "secret")
            backend.secret_fingerprint = CLIENT_KEY_FINGERPRINT
        else:
            with problems.check():
                _apply_secret(backend, secret)
    if clean_name and Backend.objects.filter(name=clean_name).exists():
        problems.found.append(Conflict(_name_taken(clean_name), "name"))
    problems.raise_if_any()
    return backend


def _name_taken(name: str) -> str:
    # Someone adding a backend under a name in use usually means to change its key.
    return (
        f"a backend named {name!r} exists; to replace its key, rotate it (`manage.py backend "
        f"rotate {name}`), or add a key to its pool (`manage.py backend key-add {name}`)"
    )


def backend_add(
    *,
    name: str,
    secret: str = "",
    client_key: bool = False,
    kind: str = DEFAULT_KIND,
    base_url: str | None = None,
    ttl: TtlBounds | None = None,
    federation: FederationSettings | None = None,
    validate: bool = False,
    allow_invalid: bool = False,
    checked: ValidationResult | None = None,
    by: User = None,
) -> Backend:
    """Store a backend. With ``validate`` its key is checked against the upstream first (an
    invalid one is refused with KeyRefused, unless ``allow_invalid``) and the answer is
    stored with it; ``checked`` is that answer when the caller already asked (the admin
    form). Otherwise the worker validates it after the commit."""
    backend = backend_add_check(
        name=name,
        secret=secret,
        client_key=client_key,
        kind=kind,
        base_url=base_url,
        ttl=ttl,
        federation=federation,
    )
    pending: PendingKey | None = getattr(backend, "_pending_key", None)
    if validate and checked is None and pending is not None:
        checked = backend_check_new_key(
            backend=backend, secret=pending.secret, allow_invalid=allow_invalid
        )
    backend = _backend_save_new(
        backend, pending, client_key=client_key, checked=checked, queue=not validate, by=by
    )
    if validate and backend.federated:
        # Nothing to refuse before saving: the exchange needs the backend's own settings.
        backend_validate(backend=backend)
    return backend


@transaction.atomic
def _backend_save_new(
    backend: Backend,
    pending: PendingKey | None,
    *,
    client_key: bool,
    checked: ValidationResult | None,
    queue: bool,
    by: User,
) -> Backend:
    try:
        with transaction.atomic():
            backend.save()
    except IntegrityError:
        raise Conflict(_name_taken(backend.name), "name") from None
    key = None
    if pending is not None:
        key = BackendKey.objects.create(
            backend=backend,
            secret=pending.secret,
            fingerprint=pending.fingerprint,
            auth_scheme=pending.scheme,
        )
        del backend._pending_key  # type: ignore[attr-defined]
    access_changed()
    audit_record(
        action="backend.added",
        by=by,
        backend=backend.name,
        kind=backend.kind,
        base_url=backend.base_url,
        fingerprint=backend.secret_fingerprint,
        client_key=client_key,
        **backend_federation(backend),
    )
    if key is not None and checked is not None:
        backend_record_checked(backend, key, checked)
    elif queue and not client_key:
        backend_queue_validation(backend)
    return backend


def backend_federation(backend: Backend) -> dict[str, Any]:
    """A workload-identity backend's federation settings (empty for any other backend), as
    the API shows them and the audit records them."""
    if not backend.federated:
        return {}
    return {
        "federation_rule_id": backend.federation_rule_id,
        "organization_id": backend.organization_id,
        "service_account_id": backend.service_account_id,
        "workspace_id": backend.workspace_id,
        "audience": backend.federation_audience,
    }


@dataclass(frozen=True)
class BackendMove:
    """Where backend_update_check found a backend going: its clean new base URL (None: it
    stays) and how a new host was allowed (None: the host stays)."""

    base_url: str | None = None
    allowed_by: str | None = None


def backend_update_check(
    *,
    backend: Backend,
    base_url: str | None = None,
    ttl: TtlBounds | None = None,
    federation: FederationSettings | None = None,
    secret: str | None = None,
    key_entered: bool = False,
) -> BackendMove:
    """Every rule of backend_update, every problem named at once, each on its field.

    ``secret`` is the stored key entered again (checked against it); ``key_entered`` says a
    key comes with this change some other way (the admin rotates to it first), which, like
    ``secret``, allows a move to a new host. Changes nothing.
    """
    problems = Problems()
    if secret is not None:
        with problems.check():
            _check_entered_secret(backend, secret)
    move = BackendMove()
    if base_url is not None:
        with problems.check():
            clean_url = backend_clean_base_url(base_url)
            if clean_url != backend.base_url:
                move = BackendMove(
                    clean_url,
                    backend_check_move(
                        backend=backend,
                        base_url=clean_url,
                        key_entered=key_entered or secret is not None,
                    ),
                )
    if federation is not None and federation.given():
        if not backend.federated:
            problems.add(
                f"backend {backend.name} is {backend.kind}; only an anthropic-wif backend "
                "takes them",
                "federation",
            )
        else:
            with problems.check():
                _apply_federation(copy.copy(backend), federation)
    if ttl is not None:
        with problems.check():
            ttl.check()
    problems.raise_if_any()
    return move


@transaction.atomic
def backend_update(
    *,
    backend: Backend,
    base_url: str | None = None,
    ttl: TtlBounds | None = None,
    enabled: bool | None = None,
    federation: FederationSettings | None = None,
    secret: str | None = None,
    by: User = None,
) -> Backend:
    """Change a backend's settings; the secret changes only through backend_rotate.

    ``secret`` is the stored key entered again, which allows a move to a new host (see
    backend_check_move); a key that does not match changes nothing.
    """
    move = backend_update_check(
        backend=backend, base_url=base_url, ttl=ttl, federation=federation, secret=secret
    )
    changed: dict[str, Any] = {}
    if federation is not None and federation.given():
        changed.update(_apply_federation(backend, federation))
        if changed:
            # Like a rotation: a validation still running for the old settings is dropped.
            backend.rotated_at = timezone.now()
    if move.base_url is not None:
        backend.base_url = changed["base_url"] = move.base_url
    current_ttl = TtlBounds(backend.token_ttl_min, backend.token_ttl_max, backend.token_ttl_default)
    if ttl is not None and ttl != current_ttl:
        backend.token_ttl_min, backend.token_ttl_max, backend.token_ttl_default = (
            ttl.minimum,
            ttl.maximum,
            ttl.default,
        )
        changed["ttl"] = [ttl.minimum, ttl.default, ttl.maximum]
    if enabled is not None and enabled != backend.enabled:
        backend.enabled = changed["enabled"] = enabled
    if changed:
        backend.save()
        access_changed()
        moved: dict[str, Any] = {"new_host_allowed_by": move.allowed_by} if move.allowed_by else {}
        audit_record(action="backend.updated", by=by, backend=backend.name, **changed, **moved)
        if not backend.client_key and ({"base_url", *FEDERATION_FIELDS} & set(changed)):
            backend_queue_validation(backend)
    return backend


def backend_rotate_check(
    *, backend: Backend, secret: str, fingerprint: str | None = None
) -> BackendKey | None:
    """The rules of backend_rotate: the backend stores keys, the new one is well formed and
    not in the pool yet, and the key it replaces is named when the pool holds several.
    Returns the key to replace (None: the pool is empty and the new key becomes its first)."""
    if backend.client_key:
        raise ServiceError(
            f"backend {backend.name} uses the agents' own keys; it has none to rotate", "secret"
        )
    if backend.federated:
        raise ServiceError(
            f"backend {backend.name} uses workload identity and has no key to rotate; "
            "change its federation settings instead",
            "secret",
        )
    _, new_fingerprint = backend_check_secret(kind=backend.kind, secret=secret)
    keys = list(backend.keys.all())
    if fingerprint is not None:
        replaced = next((key for key in keys if key.fingerprint == fingerprint), None)
        if replaced is None:
            raise NotFound(f"backend {backend.name} has no key {fingerprint}", "fingerprint")
    elif len(keys) > 1:
        raise ServiceError(
            f"backend {backend.name} has {len(keys)} keys; name the one to replace by its "
            "fingerprint",
            "fingerprint",
        )
    else:
        replaced = keys[0] if keys else None
    if any(k.fingerprint == new_fingerprint and k != replaced for k in keys):
        raise Conflict(f"backend {backend.name} already has a key {new_fingerprint}", "secret")
    return replaced


def backend_rotate(
    *,
    backend: Backend,
    secret: str,
    fingerprint: str | None = None,
    validate: bool = False,
    allow_invalid: bool = False,
    checked: ValidationResult | None = None,
    by: User = None,
) -> Backend:
    """Replace a key in place (the only one, or the one named by ``fingerprint``): agents
    and their tokens refer to the backend, not the key; its weight and place stay.
    ``validate``, ``allow_invalid`` and ``checked`` as for backend_add."""
    if validate and checked is None:
        backend_rotate_check(backend=backend, secret=secret, fingerprint=fingerprint)
        checked = backend_check_new_key(backend=backend, secret=secret, allow_invalid=allow_invalid)
    return _backend_rotate(
        backend=backend, secret=secret, fingerprint=fingerprint, checked=checked, by=by
    )


@transaction.atomic
def _backend_rotate(
    *,
    backend: Backend,
    secret: str,
    fingerprint: str | None,
    checked: ValidationResult | None,
    by: User,
) -> Backend:
    replaced = backend_rotate_check(backend=backend, secret=secret, fingerprint=fingerprint)
    scheme, new_fingerprint = backend_check_secret(kind=backend.kind, secret=secret)
    key = replaced or BackendKey(backend=backend)
    old_fingerprint = key.fingerprint if replaced else backend.secret_fingerprint
    key.secret, key.fingerprint, key.auth_scheme = secret.strip(), new_fingerprint, scheme
    key.validation_state = ValidationState.UNKNOWN
    key.validation_message = ""
    key.validation_checked_at = None
    key.save()
    backend.rotated_at = timezone.now()
    backend_summarize(backend)
    access_changed()
    audit_record(
        action="backend.rotated",
        by=by,
        backend=backend.name,
        old_fingerprint=old_fingerprint,
        fingerprint=new_fingerprint,
    )
    if checked is not None:
        backend_record_checked(backend, key, checked)
    else:
        backend_queue_validation(backend, key)
    return backend


def backend_summarize(backend: Backend) -> None:
    """Save the backend's description of its pool: the fingerprint and scheme of its first
    enabled key, and a validation state that is valid while any enabled key is (else the
    first enabled key's). One key: exactly that key's state, as before pools."""
    keys = [key for key in backend.keys.all() if key.enabled]
    if keys:
        first = keys[0]
        valid = [key for key in keys if key.validation_state == ValidationState.VALID]
        shown = valid[0] if valid else first
        backend.secret_fingerprint, backend.auth_scheme = first.fingerprint, first.auth_scheme
        backend.validation_state = shown.validation_state
        backend.validation_checked_at = max(
            (k.validation_checked_at for k in keys if k.validation_checked_at), default=None
        )
        backend.validation_message = shown.validation_message
        if len(keys) > 1:
            backend.validation_message = (
                f"{len(valid)} of {len(keys)} enabled keys valid; {shown.fingerprint}: "
                f"{shown.validation_message}"
            )[:500]
    backend.save()


def backend_remove_refusal(*, backend: Backend, force: bool = False) -> str | None:
    """Why backend_remove would refuse now (live tokens, unless forced), or None; the admin
    shows it on its delete page before anyone confirms."""
    from broker.services.tokens import tokens_live

    live = len(tokens_live(backend=backend))
    if live and not force:
        return (
            f"backend {backend.name} has {live} live token(s); revoke them first or force "
            "the removal (which revokes them)"
        )
    return None


@transaction.atomic
def backend_remove(*, backend: Backend, force: bool = False, by: User = None) -> None:
    """Delete a backend with its grants and token history; while tokens for it are live,
    only when forced (revoking them). Every entry point removes backends through here."""
    from broker.services.tokens import tokens_revoke_all

    refusal = backend_remove_refusal(backend=backend, force=force)
    if refusal:
        raise Conflict(refusal)
    revoked = tokens_revoke_all(backend=backend, by=by, reason="backend removed") if force else 0
    name = backend.name
    backend.delete()
    access_changed()
    audit_record(action="backend.removed", by=by, backend=name, forced=force, revoked=revoked)


def backend_get(*, name: str) -> Backend:
    try:
        return Backend.objects.get(name=name)
    except Backend.DoesNotExist:
        raise NotFound(f"no backend named {name!r}") from None


@dataclass(frozen=True)
class ValidationResult:
    state: ValidationState
    message: str


def _upstream_error_message(response: httpx.Response) -> str:
    """Anthropic's error body is {"type": "error", "error": {"type", "message"}}."""
    try:
        error = response.json().get("error", {})
        detail = f"{error.get('type', 'error')}: {error.get('message', '')}".strip(": ")
    except (ValueError, AttributeError):
        detail = response.text[:200]
    return f"upstream answered {response.status_code}" + (f" ({detail})" if detail else "")


def backend_check(
    *, backend: Backend, key: BackendKey | None = None, timeout: float | None = None
) -> ValidationResult:
    """Ask the upstream whether a key works: GET {base_url}/v1/models with ``key`` (by
    default the backend's first enabled key), or with a federated access token, waiting
    ``timeout`` seconds for it (KEYBROKER_VALIDATE_TIMEOUT by default)."""
    timeout = timeout or settings.BACKEND_VALIDATE_TIMEOUT_SECONDS
    if backend.client_key:
        return ValidationResult(
            ValidationState.UNKNOWN, "keys come from the agents; there is no stored key to check"
        )
    provider = provider_for(backend.kind)
    url = backend.base_url + provider.models_path
    host = urlsplit(backend.base_url).netloc
    secret, what = (key.secret if key is not None else backend.secret), "the key"
    federation = federation_of(backend)
    if federation is not None:
        # Validation takes the same path as a proxied call: the shared, cached access token
        # (exchanged now if there is none), then GET /v1/models with it.
        try:
            secret, what = federation_token(federation).token, "the federated access token"
        except FederationError as exc:
            state = ValidationState.UNREACHABLE if exc.unreachable else ValidationState.INVALID
            return ValidationResult(state, exc.message)
    try:
        response = httpx.get(
            url,
            headers=provider.validation_headers(secret),
            timeout=timeout,
            follow_redirects=False,
        )
    except httpx.TimeoutException:
        return ValidationResult(
            ValidationState.UNREACHABLE,
            f"{host} did not answer within {timeout:g}s",
        )
    except httpx.TransportError as exc:
        return ValidationResult(
            ValidationState.UNREACHABLE, f"cannot reach {host} ({type(exc).__name__})"
        )
    if response.status_code == 200:
        return ValidationResult(ValidationState.VALID, f"{host} accepted {what}")
    if federation is not None and response.status_code == 401:
        federation_forget(federation, secret)
    message = _upstream_error_message(response)
    if response.status_code in {401, 403}:
        return ValidationResult(ValidationState.INVALID, message)
    # 429, 5xx, 529 and the like say nothing about the key itself.
    return ValidationResult(ValidationState.UNREACHABLE, message)


# How long adding or rotating a key waits for the upstream's verdict: someone is waiting at
# a prompt or a form. The scheduled validation keeps KEYBROKER_VALIDATE_TIMEOUT.
NEW_KEY_CHECK_TIMEOUT_SECONDS = 5


class KeyRefused(ServiceError):
    """The upstream refused a key being added or rotated in; nothing was saved."""

    status_code = 422
    error_type = "key_invalid"

    def __init__(self, message: str, result: ValidationResult) -> None:
        super().__init__(message, "secret")
        self.result = result


def backend_check_new_key(
    *, backend: Backend, secret: str, allow_invalid: bool = False
) -> ValidationResult:
    """Ask the upstream about a key before it is stored (add, rotate, a key added to the
    pool), as the scheduled validation asks about stored ones, but within a few seconds.
    An invalid key is refused (KeyRefused) unless ``allow_invalid``; an upstream that
    cannot be reached is no reason to refuse: the key is saved unchecked."""
    result = backend_check(
        backend=backend,
        key=BackendKey(backend=backend, secret=secret.strip()),
        timeout=min(settings.BACKEND_VALIDATE_TIMEOUT_SECONDS, NEW_KEY_CHECK_TIMEOUT_SECONDS),
    )
    if result.state == ValidationState.INVALID and not allow_invalid:
        raise KeyRefused(
            f"{urlsplit(backend.base_url).netloc} refused this key ({redact(result.message)}); "
            "nothing was saved: check that it is the whole key, of the right account",
            result,
        )
    return result


def backend_check_outcome(backend: Backend, result: ValidationResult) -> str:
    """What a new or rotated key's check found and what to do next, in one sentence for
    the CLI and the admin."""
    if result.state == ValidationState.VALID:
        return f"valid: {result.message}"
    if result.state == ValidationState.INVALID and backend.federated:
        return (
            f"saved, but invalid: {result.message}; calls to it fail until its federation "
            "settings match the Claude Console's (docs/workload-identity.md)"
        )
    if result.state == ValidationState.INVALID:
        return (
            f"saved, but invalid: {result.message}; calls with it fail until it is replaced "
            f"(`manage.py backend rotate {backend.name}`)"
        )
    every = settings.BACKEND_VALIDATE_INTERVAL_SECONDS // 60
    return (
        f"saved unchecked: {result.message}; the scheduled validation (every {every} min) "
        f"checks it again, or run `manage.py backend validate {backend.name}`"
    )


def backend_record_checked(backend: Backend, key: BackendKey, result: ValidationResult) -> None:
    """Store the check made before saving as the key's validation (the same state and
    audit event as a scheduled one), then the backend's summary of its pool."""
    _record_validation(BackendKey.objects.filter(pk=key.pk), result, backend=backend, key=key)
    backend_summarize(backend)


_VALIDATION_ACTIONS = {
    ValidationState.VALID: "backend.validated",
    ValidationState.INVALID: "backend.invalid",
}


def backend_validate(*, backend: Backend, key: BackendKey | None = None) -> ValidationResult:
    """Check the backend's enabled keys (or only ``key``) now and record each outcome,
    unless the key was rotated or removed meanwhile; returns the backend's summary (a
    keyless backend: its one check)."""
    if backend.client_key or backend.federated:
        result = backend_check(backend=backend)
        recorded = _record_validation(
            Backend.objects.filter(
                pk=backend.pk,
                secret_fingerprint=backend.secret_fingerprint,
                rotated_at=backend.rotated_at,
            ),
            result,
            backend=backend,
        )
        if recorded:
            backend.refresh_from_db()
        return result
    keys = [key] if key is not None else [k for k in backend.keys.all() if k.enabled]
    for checked in keys:
        _record_validation(
            # A rotation anywhere in the pool drops results still on their way, as it did
            # for a backend's one key (a new key may share the old one's fingerprint).
            BackendKey.objects.filter(
                pk=checked.pk,
                fingerprint=checked.fingerprint,
                backend__rotated_at=backend.rotated_at,
            ),
            backend_check(backend=backend, key=checked),
            backend=backend,
            key=checked,
        )
    with transaction.atomic():
        locked = Backend.objects.select_for_update().filter(pk=backend.pk).first()
        if locked is not None:
            backend_summarize(locked)
    if locked is None:
        return ValidationResult(ValidationState.UNKNOWN, f"backend {backend.name} is gone")
    backend.refresh_from_db()
    return ValidationResult(ValidationState(backend.validation_state), backend.validation_message)


def _record_validation(
    unchanged: QuerySet[Any],
    result: ValidationResult,
    *,
    backend: Backend,
    key: BackendKey | None = None,
) -> bool:
    """Store ``result`` on the row ``unchanged`` still selects and audit it; a row that no
    longer matches (rotated or removed while it was being checked) keeps its state, and
    the answer is False."""
    message = redact(result.message)[:500]
    what = f"key {key.fingerprint} of backend {backend.name}" if key else f"backend {backend.name}"
    with transaction.atomic():
        before = set(unchanged.values_list("validation_state", flat=True))
        updated = unchanged.update(
            validation_state=result.state,
            validation_message=message,
            validation_checked_at=timezone.now(),
        )
        if not updated:
            logger.info("%s changed while being validated; result dropped", what)
            return False
        if (ValidationState.INVALID in before) != (result.state == ValidationState.INVALID):
            # The proxy refuses calls to a backend whose every key is invalid: a key that
            # becomes invalid, or valid again, changes what it serves at once.
            access_changed()
        detail: dict[str, Any] = {"fingerprint": key.fingerprint} if key else {}
        audit_record(
            action=_VALIDATION_ACTIONS.get(result.state, "backend.unreachable"),
            backend=backend.name,
            message=message,
            state=result.state,
            **detail,
        )
    if result.state != ValidationState.VALID:
        logger.warning("%s is %s: %s", what, result.state, message)
    return True
