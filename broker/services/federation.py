"""Workload identity for backends: keybroker's own JWT exchanged upstream for an access token.

A federated backend (kind ``anthropic-wif``) stores no key. To call it, keybroker signs a JWT
as its own OIDC issuer (``sub`` = ``backend:<name>``, ``aud`` = the backend's audience) and
exchanges it at the upstream's ``POST /v1/oauth/token`` (RFC 7523 jwt-bearer) for a
short-lived access token, which the proxy then sends as ``Authorization: Bearer``.

The token is shared by every process through Redis, encrypted like a stored secret, and is
replaced before it runs out (``refresh_margin``). One exchange at a time: a process that
finds no fresh token takes a Redis lock (SET NX PX) and exchanges; the others wait for its
result instead of exchanging too. In each process, the proxy adds its own single flight and
an in-memory copy on top (proxy/federation.py), so a busy backend costs no Redis call per
request. With Redis down, each process exchanges for itself and keeps the token in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from dataclasses import astuple, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from django.core import signing

from audit.services import audit_record
from broker.infra.fields import secret_box
from broker.infra.redis import redis_client, redis_key
from broker.models import Backend
from broker.services.oidc import oidc_backend_assertion
from keybroker.wire import redact

logger = logging.getLogger(__name__)

GRANT_TYPE_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_PATH = "/v1/oauth/token"  # noqa: S105 - a path, not a password
# The jwt-bearer exchange needs both: the OAuth flag, and the federation flag (only ever on
# this request; API calls carry the OAuth flag alone).
EXCHANGE_BETAS = "oauth-2025-04-20,oidc-federation-2026-04-01"
EXCHANGE_TIMEOUT_SECONDS = 15.0
# The lock outlives the slowest exchange, so a process that dies holding it blocks the
# others for at most this long.
LOCK_SECONDS = 30
WAIT_POLL_SECONDS = 0.05
# A token this close to its expiry is not handed out any more, even while a refresh runs.
USABLE_MARGIN_SECONDS = 10
MAX_RESPONSE_BYTES = 1 << 20

# The clock every freshness decision reads; tests move it to see a token near its expiry.
clock = time.time

_RELEASE = """
if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end
return 0
"""


class FederationError(Exception):
    """The exchange failed. The message names the cause, never a token or an assertion."""

    def __init__(self, message: str, *, unreachable: bool = False, timed_out: bool = False):
        super().__init__(message)
        self.message = message
        self.unreachable = unreachable or timed_out  # says nothing about the settings
        self.timed_out = timed_out


@dataclass(frozen=True)
class Federation:
    """Where and how a backend exchanges: plain data, cached with the proxy's route."""

    backend: str
    base_url: str
    audience: str
    federation_rule_id: str
    organization_id: str
    service_account_id: str = ""
    workspace_id: str = ""

    @property
    def cache_key(self) -> str:
        # Every setting is part of the key: after a change, no process can pick up a token
        # that was minted for the old settings.
        return hashlib.sha256(json.dumps(astuple(self)).encode()).hexdigest()[:32]

    def request_body(self, assertion: str) -> dict[str, str]:
        body = {
            "grant_type": GRANT_TYPE_JWT_BEARER,
            "assertion": assertion,
            "federation_rule_id": self.federation_rule_id,
            "organization_id": self.organization_id,
        }
        if self.service_account_id:
            body["service_account_id"] = self.service_account_id
        if self.workspace_id:
            body["workspace_id"] = self.workspace_id
        return body


def federation_of(backend: Backend) -> Federation | None:
    if not backend.federated:
        return None
    return Federation(
        backend=backend.name,
        base_url=backend.base_url,
        audience=backend.federation_audience,
        federation_rule_id=backend.federation_rule_id,
        organization_id=backend.organization_id,
        service_account_id=backend.service_account_id,
        workspace_id=backend.workspace_id,
    )


def refresh_margin(lifetime: float) -> float:
    """How long before its expiry a token is replaced: a minute, or a tenth of a long
    lifetime, but never more than half of it (a 60 s token is not stale at birth)."""
    return min(max(60.0, lifetime / 10), lifetime / 2)


@dataclass(frozen=True)
class FederatedToken:
    token: str = field(repr=False)
    expires_at: float
    refresh_at: float

    def fresh(self, now: float) -> bool:
        return now < self.refresh_at

    def usable(self, now: float) -> bool:
        return now < self.expires_at - USABLE_MARGIN_SECONDS

    def digest(self) -> str:
        return hashlib.sha256(self.token.encode()).hexdigest()


# --- the exchange itself ---------------------------------------------------------------------
def _upstream_reason(response: httpx.Response) -> str:
    """What the token endpoint said, from the fields meant for it; never its whole body,
    which a misbehaving endpoint could fill with the assertion it was sent."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    if isinstance(error, dict):  # Anthropic's API shape
        reason = f"{error.get('type', '')}: {error.get('message', '')}"
    else:  # RFC 6749's
        reason = f"{error or ''}: {body.get('error_description', '')}"
    return redact(reason.strip(": "))[:200]


def federation_exchange(federation: Federation) -> FederatedToken:
    """Sign a fresh JWT and exchange it upstream, now; audited either way. No caching here."""
    assertion = oidc_backend_assertion(
        backend_name=federation.backend, audience=federation.audience
    )
    host = urlsplit(federation.base_url).netloc
    try:
        token = _post_exchange(federation, assertion.jwt, host)
    except FederationError as exc:
        audit_record(
            action="backend.token_exchange_failed",
            backend=federation.backend,
            message=exc.message,
            jti=assertion.jti,
            kid=assertion.kid,
            subject=assertion.subject,
        )
        logger.warning("backend %s: %s", federation.backend, exc.message)
        raise
    audit_record(
        action="backend.token_exchanged",
        backend=federation.backend,
        jti=assertion.jti,
        kid=assertion.kid,
        subject=assertion.subject,
        audience=federation.audience,
        expires_in=round(token.expires_at - clock()),
    )
    return token


def _post_exchange(federation: Federation, assertion: str, host: str) -> FederatedToken:
    try:
        response = httpx.post(
            federation.base_url + TOKEN_PATH,
            json=federation.request_body(assertion),
            headers={"anthropic-beta": EXCHANGE_BETAS, "anthropic-version": "2023-06-01"},
            timeout=EXCHANGE_TIMEOUT_SECONDS,
            follow_redirects=False,
        )
    except httpx.TimeoutException:
        raise FederationError(
            f"token exchange: {host} did not answer within {EXCHANGE_TIMEOUT_SECONDS:g}s",
            timed_out=True,
        ) from None
    except httpx.TransportError as exc:
        raise FederationError(
            f"token exchange: cannot reach {host} ({type(exc).__name__})", unreachable=True
        ) from None
    if response.status_code != 200:
        reason = _upstream_reason(response)
        raise FederationError(
            f"token exchange refused: upstream answered {response.status_code}"
            + (f" ({reason})" if reason else ""),
            # Overload or an outage says nothing about the federation settings.
            unreachable=response.status_code == 429 or response.status_code >= 500,
        )
    return _parse_token(response)


def _parse_token(response: httpx.Response) -> FederatedToken:
    broken = FederationError("token exchange answered 200 without a usable access token")
    if len(response.content) > MAX_RESPONSE_BYTES:
        raise broken
    try:
        data = response.json()
    except ValueError:
        raise broken from None
    if not isinstance(data, dict):
        raise broken
    token, expires_in = data.get("access_token"), data.get("expires_in")
    token_type = data.get("token_type")
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise broken
    if token_type is not None and str(token_type).lower() != "bearer":
        raise FederationError(
            f"token exchange answered a {str(token_type)[:20]!r} token, not Bearer"
        )
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise broken
    now = clock()
    return FederatedToken(
        token=token,
        expires_at=now + expires_in,
        refresh_at=now + expires_in - refresh_margin(expires_in),
    )


# --- shared across processes through Redis -------------------------------------------------
def _token_key(federation: Federation) -> str:
    return redis_key("federation", "token", federation.cache_key)


def _lock_key(federation: Federation) -> str:
    return redis_key("federation", "lock", federation.cache_key)


def _read_shared(federation: Federation) -> FederatedToken | None:
    raw = redis_client().get(_token_key(federation))
    if not isinstance(raw, bytes):
        return None
    try:
        data: dict[str, Any] = json.loads(secret_box().decrypt(raw))
        return FederatedToken(data["token"], float(data["expires_at"]), float(data["refresh_at"]))
    except (signing.BadSignature, ValueError, KeyError, TypeError):
        # Written under another encryption key (rotated since), or damaged: exchange anew.
        return None


def _write_shared(federation: Federation, token: FederatedToken) -> None:
    ttl_ms = int((token.expires_at - clock()) * 1000)
    if ttl_ms <= 0:
        return
    record = json.dumps(
        {"token": token.token, "expires_at": token.expires_at, "refresh_at": token.refresh_at}
    )
    redis_client().set(_token_key(federation), secret_box().encrypt(record.encode()), px=ttl_ms)


def federation_token(federation: Federation) -> FederatedToken:
    """A fresh access token for the backend: the shared one, or a new exchange by exactly
    one process while the others wait for it. Blocking: call it from a worker thread."""
    try:
        return _federation_token_shared(federation)
    except (redis.RedisError, OSError):
        logger.warning(
            "backend %s: Redis unreachable; exchanging without the shared token cache",
            federation.backend,
        )
        return federation_exchange(federation)


def _federation_token_shared(federation: Federation) -> FederatedToken:
    cached = _read_shared(federation)
    if cached is not None and cached.fresh(clock()):
        return cached
    client = redis_client()
    deadline = time.monotonic() + LOCK_SECONDS
    while True:
        owner = secrets.token_hex(8)
        if client.set(_lock_key(federation), owner, nx=True, px=LOCK_SECONDS * 1000):
            try:
                # Someone may have finished an exchange between our read and the lock.
                cached = _read_shared(federation)
                if cached is not None and cached.fresh(clock()):
                    return cached
                token = federation_exchange(federation)
                _share(federation, token)
                return token
            finally:
                _release(federation, owner)
        cached = _read_shared(federation)
        now = clock()
        if cached is not None and (cached.fresh(now) or cached.usable(now)):
            # Fresh from the other process, or still good while it refreshes it.
            return cached
        if time.monotonic() > deadline:
            raise FederationError(
                "token exchange: another process held the exchange lock too long", timed_out=True
            )
        time.sleep(WAIT_POLL_SECONDS)


def _share(federation: Federation, token: FederatedToken) -> None:
    # The exchange happened: losing Redis now must not cost a second one. The others find
    # no entry once the lock goes, and exchange for themselves.
    try:
        _write_shared(federation, token)
    except (redis.RedisError, OSError):
        logger.warning(
            "backend %s: could not share its access token over Redis", federation.backend
        )


def _release(federation: Federation, owner: str) -> None:
    # Unreleased, the lock expires by itself within LOCK_SECONDS.
    with contextlib.suppress(redis.RedisError, OSError):
        redis_client().eval(_RELEASE, 1, _lock_key(federation), owner)


def federation_forget(federation: Federation, token: str) -> None:
    """The upstream refused ``token``: drop it from the shared cache, unless it was replaced
    meanwhile, so the next call exchanges anew."""
    try:
        cached = _read_shared(federation)
        if cached is not None and cached.token == token:
            redis_client().delete(_token_key(federation))
    except (redis.RedisError, OSError):
        logger.warning(
            "backend %s: Redis unreachable; could not drop a refused token", federation.backend
        )
