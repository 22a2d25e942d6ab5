"""Backends: add, rotate, validate and remove upstream credentials."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.services import audit_record
from broker.errors import Conflict, NotFound, ServiceError
from broker.logging import redact
from broker.models import Backend, ValidationState, name_validator
from broker.services.access import access_changed
from proxy.providers import Provider, ProviderError, provider_for

logger = logging.getLogger(__name__)

User = AbstractBaseUser | AnonymousUser | None
MAX_TTL_SECONDS = 24 * 3600


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def backend_clean_base_url(raw: str) -> str:
    """An upstream base URL: https, or http only on loopback (local fakes and tests)."""
    try:
        parts = urlsplit(raw.strip())
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ServiceError("base_url: not a valid URL") from None
    if parts.scheme not in {"http", "https"} or not host:
        raise ServiceError("base_url: must be an https:// URL such as https://api.anthropic.com")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ServiceError("base_url: must use https:// (plain http is allowed only on loopback)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ServiceError("base_url: must not carry credentials, a query or a fragment")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def backend_clean_name(name: str) -> str:
    try:
        name_validator(name)
    except ValidationError as exc:
        raise ServiceError(f"name: {exc.messages[0]}") from None
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
                f"(got min {self.minimum}s, default {self.default}s, max {self.maximum}s)"
            )


def backend_check_kind(kind: str) -> Provider:
    try:
        return provider_for(kind)
    except ProviderError as exc:
        raise ServiceError(f"kind: {exc}") from None


def backend_check_secret(*, kind: str, secret: str) -> tuple[str, str]:
    """The (auth scheme, fingerprint) of a well-formed secret; ServiceError otherwise."""
    provider = backend_check_kind(kind)
    secret = secret.strip()
    if not secret:
        raise ServiceError("secret: must not be empty")
    try:
        return provider.auth_scheme(secret).name, provider.fingerprint(secret)
    except ProviderError as exc:
        raise ServiceError(f"secret: {exc}") from None


def _apply_secret(backend: Backend, secret: str) -> None:
    scheme, fingerprint = backend_check_secret(kind=backend.kind, secret=secret)
    backend.secret = secret.strip()
    backend.secret_fingerprint = fingerprint
    backend.auth_scheme = scheme
    backend.validation_state = ValidationState.UNKNOWN
    backend.validation_message = ""
    backend.validation_checked_at = None


def _queue_validation(backend: Backend) -> None:
    from broker.tasks import backend_validate_task

    transaction.on_commit(lambda: backend_validate_task.delay(backend.pk))


CLIENT_KEY_FINGERPRINT = "(the agent's own key)"


@transaction.atomic
def backend_add(
    *,
    name: str,
    secret: str = "",
    client_key: bool = False,
    kind: str = "anthropic",
    base_url: str | None = None,
    ttl: TtlBounds | None = None,
    by: User = None,
) -> Backend:
    provider = backend_check_kind(kind)
    ttl = ttl or TtlBounds()
    ttl.check()
    backend = Backend(
        name=backend_clean_name(name),
        kind=kind,
        base_url=backend_clean_base_url(base_url or provider.default_base_url),
        token_ttl_min=ttl.minimum,
        token_ttl_max=ttl.maximum,
        token_ttl_default=ttl.default,
        client_key=client_key,
    )
    if client_key:
        if secret.strip():
            raise ServiceError("secret: a --client-key backend stores no secret; leave it out")
        backend.secret_fingerprint = CLIENT_KEY_FINGERPRINT
    else:
        _apply_secret(backend, secret)
    if Backend.objects.filter(name=backend.name).exists():
        raise Conflict(f"a backend named {backend.name!r} exists")
    try:
        with transaction.atomic():
            backend.save()
    except IntegrityError:
        raise Conflict(f"a backend named {backend.name!r} exists") from None
    access_changed()
    audit_record(
        action="backend.added",
        by=by,
        backend=backend.name,
        kind=backend.kind,
        base_url=backend.base_url,
        fingerprint=backend.secret_fingerprint,
        client_key=client_key,
    )
    if not client_key:
        _queue_validation(backend)
    return backend


@transaction.atomic
def backend_update(
    *,
    backend: Backend,
    base_url: str | None = None,
    ttl: TtlBounds | None = None,
    enabled: bool | None = None,
    by: User = None,
) -> Backend:
    """Change a backend's settings; the secret changes only through backend_rotate."""
    changed: dict[str, Any] = {}
    if base_url is not None:
        clean = backend_clean_base_url(base_url)
        if clean != backend.base_url:
            backend.base_url = changed["base_url"] = clean
    current_ttl = TtlBounds(backend.token_ttl_min, backend.token_ttl_max, backend.token_ttl_default)
    if ttl is not None and ttl != current_ttl:
        ttl.check()
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
        audit_record(action="backend.updated", by=by, backend=backend.name, **changed)
        if "base_url" in changed and not backend.client_key:
            _queue_validation(backend)
    return backend


@transaction.atomic
def backend_rotate(*, backend: Backend, secret: str, by: User = None) -> Backend:
    """Replace the secret in place: agents and their tokens refer to the backend, not the key."""
    if backend.client_key:
        raise ServiceError(
            f"backend {backend.name} uses the agents' own keys; it has none to rotate"
        )
    old_fingerprint = backend.secret_fingerprint
    _apply_secret(backend, secret)
    backend.rotated_at = timezone.now()
    backend.save()
    access_changed()
    audit_record(
        action="backend.rotated",
        by=by,
        backend=backend.name,
        old_fingerprint=old_fingerprint,
        fingerprint=backend.secret_fingerprint,
    )
    _queue_validation(backend)
    return backend


@transaction.atomic
def backend_remove(*, backend: Backend, force: bool = False, by: User = None) -> None:
    """Delete a backend; while tokens for it are live, only when forced (revoking them)."""
    from broker.services.tokens import tokens_live, tokens_revoke_all

    live = len(tokens_live(backend=backend))
    if live and not force:
        raise Conflict(
            f"backend {backend.name} has {live} live token(s); revoke them first or force "
            "the removal (which revokes them)"
        )
    revoked = tokens_revoke_all(backend=backend, by=by, reason="backend removed") if live else 0
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


def backend_check(*, backend: Backend) -> ValidationResult:
    """Ask the upstream whether the secret works: GET {base_url}/v1/models."""
    if backend.client_key:
        return ValidationResult(
            ValidationState.UNKNOWN, "keys come from the agents; there is no stored key to check"
        )
    provider = provider_for(backend.kind)
    url = backend.base_url + provider.models_path
    host = urlsplit(backend.base_url).netloc
    try:
        response = httpx.get(
            url,
            headers=provider.validation_headers(backend.secret),
            timeout=settings.BACKEND_VALIDATE_TIMEOUT_SECONDS,
            follow_redirects=False,
        )
    except httpx.TimeoutException:
        return ValidationResult(
            ValidationState.UNREACHABLE,
            f"{host} did not answer within {settings.BACKEND_VALIDATE_TIMEOUT_SECONDS}s",
        )
    except httpx.TransportError as exc:
        return ValidationResult(
            ValidationState.UNREACHABLE, f"cannot reach {host} ({type(exc).__name__})"
        )
    if response.status_code == 200:
        return ValidationResult(ValidationState.VALID, f"{host} accepted the key")
    message = _upstream_error_message(response)
    if response.status_code in {401, 403}:
        return ValidationResult(ValidationState.INVALID, message)
    # 429, 5xx, 529 and the like say nothing about the key itself.
    return ValidationResult(ValidationState.UNREACHABLE, message)


def backend_validate(*, backend: Backend) -> ValidationResult:
    """Check the secret now and record the outcome, unless it was rotated meanwhile."""
    result = backend_check(backend=backend)
    message = redact(result.message)[:500]
    with transaction.atomic():
        updated = Backend.objects.filter(
            pk=backend.pk,
            secret_fingerprint=backend.secret_fingerprint,
            rotated_at=backend.rotated_at,
        ).update(
            validation_state=result.state,
            validation_message=message,
            validation_checked_at=timezone.now(),
        )
        if not updated:
            logger.info("backend %s changed while being validated; result dropped", backend.name)
            return result
        action = {
            ValidationState.VALID: "backend.validated",
            ValidationState.INVALID: "backend.invalid",
        }.get(result.state, "backend.unreachable")
        audit_record(action=action, backend=backend.name, message=message, state=result.state)
    backend.refresh_from_db()
    if result.state != ValidationState.VALID:
        logger.warning("backend %s is %s: %s", backend.name, result.state, message)
    return result
