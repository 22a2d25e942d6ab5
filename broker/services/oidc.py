"""keybroker as an OIDC issuer: client credentials for agents, signed JWTs, discovery, JWKS."""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from broker.infra.errors import OAuthError
from broker.infra.secrets import secret_digest, secret_issue
from broker.models import (
    Agent,
    AgentStatus,
    IdentityGrant,
    OidcClient,
    SigningKey,
    touch_last_used_row,
)
from broker.services.access import agent_refusal, agent_require_approved
from broker.services.throttles import auth_failure, auth_throttle_check

logger = logging.getLogger(__name__)

CKS_PREFIX = "cks"
# RS256 is what every relying party accepts; ES256 is smaller and faster where allowed.
ALGORITHMS = ("RS256", "ES256")
GRANT_CLIENT_CREDENTIALS = "client_credentials"


@dataclass(frozen=True)
class IssuedClient:
    client: OidcClient
    client_secret: str


@dataclass(frozen=True)
class AccessToken:
    jwt: str = field(repr=False)
    expires_in: int


@dataclass(frozen=True)
class Assertion:
    """A JWT keybroker signs for itself, to exchange at a federated upstream."""

    jwt: str = field(repr=False)
    jti: str
    kid: str
    subject: str


# How long keybroker's own JWT for a federated backend lives. It is sent once, at once, and
# never stored; but Anthropic caps the access token it mints at twice the assertion's
# remaining validity, so a 30-minute assertion is what buys a full hour's access token.
BACKEND_ASSERTION_SECONDS = 1800


def issuer() -> str:
    return settings.PUBLIC_URL


def oidc_discovery() -> dict[str, Any]:
    base = issuer()
    return {
        "issuer": base,
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "token_endpoint": f"{base}/oauth/token",
        "grant_types_supported": [GRANT_CLIENT_CREDENTIALS],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": sorted(
            {key.algorithm for key in signing_keys_published()}
        ),
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "name"],
    }


# --- signing keys ------------------------------------------------------------------------
def _new_kid(public_pem: bytes) -> str:
    # RFC 7638-style: derived from the public key, so it never collides by accident.
    return base64.urlsafe_b64encode(hashlib.sha256(public_pem).digest()[:12]).decode().rstrip("=")


@transaction.atomic
def signing_key_create() -> SigningKey:
    """A key for ``KEYBROKER_OIDC_ALGORITHM``; a key keeps its algorithm until rotated."""
    algorithm = settings.OIDC_SIGNING_ALGORITHM
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey.objects.create(kid=_new_kid(public_pem), algorithm=algorithm, private_pem=pem)


def signing_key_current() -> SigningKey:
    """The key that signs new JWTs; created on first use."""
    key = SigningKey.objects.filter(retired_at__isnull=True).order_by("-created_at").first()
    return key or signing_key_create()


@transaction.atomic
def signing_key_rotate() -> SigningKey:
    """A new signing key; the old ones stay published until their last JWT has expired."""
    now = timezone.now()
    SigningKey.objects.filter(retired_at__isnull=True).update(retired_at=now)
    key = signing_key_create()
    audit_record(action="oidc.key_rotated", kid=key.kid)
    return key


def signing_keys_published() -> list[SigningKey]:
    cutoff = timezone.now() - timedelta(seconds=settings.OIDC_TOKEN_LIFETIME_SECONDS + 60)
    keys = list(SigningKey.objects.exclude(retired_at__lt=cutoff).order_by("-created_at"))
    return keys or [signing_key_current()]


def _public_key(key: SigningKey) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    private = serialization.load_pem_private_key(key.private_pem.encode(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return private.public_key()


def oidc_jwks() -> dict[str, list[dict[str, Any]]]:
    keys = []
    for key in signing_keys_published():
        public = _public_key(key)
        jwk = (
            jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
            if isinstance(public, rsa.RSAPublicKey)
            else jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        )
        keys.append({**jwk, "kid": key.kid, "alg": key.algorithm, "use": "sig"})
    return {"keys": keys}


# --- client credentials and access tokens -------------------------------------------------
@transaction.atomic
def oidc_client_create(*, agent: Agent, address: str | None = None) -> IssuedClient:
    agent_require_approved(agent)
    issued = secret_issue(CKS_PREFIX)
    client = OidcClient.objects.create(
        agent=agent,
        client_id=f"kbc_{secrets.token_urlsafe(16)}",
        secret_digest=issued.digest,
        secret_prefix=issued.display_prefix,
    )
    audit_record(
        action="oidc.client_created", agent=agent, address=address, client_id=client.client_id
    )
    return IssuedClient(client, issued.plaintext)


def _invalid_client() -> OAuthError:
    # Never say whether the id or the secret was wrong.
    return OAuthError("invalid_client", "unknown client or wrong secret", status_code=401)


def oidc_token_issue(
    *,
    grant_type: str,
    client_id: str,
    client_secret: str,
    audience: str | None = None,
    address: str | None = None,
) -> AccessToken:
    """The client_credentials grant: a signed JWT whose ``sub`` is the agent's id."""
    if grant_type != GRANT_CLIENT_CREDENTIALS:
        raise OAuthError("unsupported_grant_type", f"grant_type must be {GRANT_CLIENT_CREDENTIALS}")
    if not client_id or not client_secret:
        raise _invalid_client()
    auth_throttle_check(address=address, client_id=client_id)
    client = (
        OidcClient.objects.select_related("agent")
        .filter(
            client_id=client_id,
            secret_digest=secret_digest(client_secret),
            revoked_at__isnull=True,
        )
        .first()
    )
    if client is None:
        auth_failure(address=address, method="client_credentials", client_id=client_id)
        raise _invalid_client()
    agent = client.agent
    refusal = agent_refusal(name=agent.name, status=agent.status)
    if refusal is not None:
        # RFC 6749 fixes this endpoint's shape (400 unauthorized_client), so only the
        # wording comes from the shared table.
        raise OAuthError("unauthorized_client", refusal.message, status_code=400)
    audience = audience or issuer()
    lifetime = settings.OIDC_TOKEN_LIFETIME_SECONDS
    identity: IdentityGrant | None = None
    if audience != issuer():
        # An identity token for someone else (Anthropic's federation, say): only for an
        # audience an admin granted, and only as long as that grant says.
        identity = IdentityGrant.objects.filter(agent=agent, audience=audience).first()
        if identity is None:
            raise OAuthError(
                "invalid_target", f"agent {agent.name} may not get tokens for audience {audience}"
            )
        lifetime = min(identity.lifetime, settings.OIDC_TOKEN_LIFETIME_SECONDS)
    token, claims, kid = _sign(
        subject=str(agent.pk),
        audience=audience,
        lifetime=lifetime,
        extra={"client_id": client.client_id, "name": agent.name},
    )
    touch_last_used_row(client)
    audit_record(
        action="oidc.identity_token_issued" if identity else "oidc.token_issued",
        agent=agent,
        address=address,
        client_id=client.client_id,
        audience=audience,
        jti=claims["jti"],
        kid=kid,
        lifetime=lifetime,
    )
    return AccessToken(token, lifetime)


def _sign(
    *, subject: str, audience: str, lifetime: int, extra: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any], str]:
    """A JWT from keybroker's issuer, signed with the current key: (jwt, claims, kid)."""
    now = int(timezone.now().timestamp())
    key = signing_key_current()
    claims = {
        "iss": issuer(),
        "sub": subject,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        # Relying parties may refuse a jti they saw before (Anthropic does by default): every
        # JWT gets its own.
        "jti": secrets.token_urlsafe(16),
        **(extra or {}),
    }
    token = jwt.encode(claims, key.private_pem, algorithm=key.algorithm, headers={"kid": key.kid})
    return token, claims, key.kid


def backend_subject(backend_name: str) -> str:
    """The ``sub`` of keybroker's own JWTs for a backend; never an agent's id (a UUID)."""
    return f"backend:{backend_name}"


def oidc_backend_assertion(*, backend_name: str, audience: str) -> Assertion:
    """keybroker's JWT for a federated backend, to exchange upstream for an access token.

    Not audited here: the exchange that spends it is (``backend.token_exchanged``).
    """
    lifetime = min(BACKEND_ASSERTION_SECONDS, settings.OIDC_TOKEN_LIFETIME_SECONDS)
    subject = backend_subject(backend_name)
    token, claims, kid = _sign(subject=subject, audience=audience, lifetime=lifetime)
    return Assertion(jwt=token, jti=claims["jti"], kid=kid, subject=subject)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def oidc_authenticate(token: str) -> Agent | None:
    """The approved agent a valid, unexpired JWT of ours names; None for anything else."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    key = next((k for k in signing_keys_published() if k.kid == kid), None)
    if key is None:
        return None
    try:
        claims = jwt.decode(
            token,
            _public_key(key),
            algorithms=[key.algorithm],
            audience=issuer(),
            issuer=issuer(),
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            leeway=5,
        )
    except jwt.PyJWTError:
        return None
    client_live = OidcClient.objects.filter(
        client_id=claims.get("client_id", ""), revoked_at__isnull=True, agent_id=claims["sub"]
    ).exists()
    if not client_live:
        return None
    return Agent.objects.filter(pk=claims["sub"]).exclude(status=AgentStatus.UNENROLLED).first()
