"""The throttles keybroker applies: enrollment floods and failed authentication, each a
fixed-window counter in Redis (broker/infra/ratelimit.py), the latter audited."""

from __future__ import annotations

import logging

from django.conf import settings

from audit.services import audit_record
from broker.infra.ratelimit import Rate, RateLimited, rate_limit_check, rate_limit_hit

logger = logging.getLogger(__name__)


def enrollment_rate() -> Rate:
    return Rate.parse(settings.ENROLL_RATE)


# --- Failed authentication -----------------------------------------------------------------
# Failures are counted per client address and per client id from that address. Once either
# window is used up, attempts it covers are refused with 429 before their credential is
# looked at, so a right guess while throttled is refused too. The client id is counted per
# address, not across addresses: otherwise anyone could lock a real client out by failing
# with its (public) id. Audit rows for failures are capped per address and window; the first
# failure over the cap writes one row saying that further ones are suppressed.
AUTH_WHAT = "failed authentication"


def _auth_rates() -> tuple[Rate, Rate, Rate]:
    return (
        Rate.parse(settings.AUTH_FAILURE_RATE),
        Rate.parse(settings.AUTH_CLIENT_FAILURE_RATE),
        Rate.parse(settings.AUTH_FAILURE_AUDIT_RATE),
    )


def _auth_scopes(address: str | None, client_id: str | None) -> list[tuple[str, str, Rate]]:
    by_address, by_client, _ = _auth_rates()
    source = address or "-"
    scopes = [("authfail-address", source, by_address)]
    if client_id:
        scopes.append(("authfail-client", f"{source}|{client_id}", by_client))
    return scopes


def auth_throttle_check(*, address: str | None, client_id: str | None = None) -> None:
    """RateLimited (429) while this address, or this client id from it, is throttled."""
    for scope, key, rate in _auth_scopes(address, client_id):
        rate_limit_check(scope=scope, key=key, rate=rate, what=AUTH_WHAT)


def auth_failure(*, address: str | None, method: str, client_id: str | None = None) -> None:
    """Count one failed authentication and audit it, at most the capped number of rows."""
    *_, audit_rate = _auth_rates()
    try:
        rate_limit_hit(scope="authfail-audit", key=address or "-", rate=audit_rate, what=AUTH_WHAT)
    except RateLimited as capped:
        if capped.count == audit_rate.limit + 1:
            audit_record(
                action="auth.failed",
                address=address,
                method=method,
                suppressed=True,
                message=(
                    f"{audit_rate.limit} failed authentications from this address in "
                    f"{audit_rate.window_seconds}s: further failures suppressed for "
                    f"{capped.retry_after}s"
                ),
            )
    else:
        audit_record(action="auth.failed", address=address, method=method)
    for scope, key, rate in _auth_scopes(address, client_id):
        rate_limit_hit(scope=scope, key=key, rate=rate, what=AUTH_WHAT)
