"""What keybroker answers in the upstream's place, and what that answer says happened.

Each answer has a status, an error type (Anthropic's names), a message and perhaps headers,
and goes out in the backend's provider's error shape (proxy/providers/) so SDKs raise it
as they would the upstream's own. The class
says what happened, and so how the call is audited: keybroker refused the caller
(``AccessDenied`` in proxy/access.py, ``PolicyDenied`` in proxy/policy.py), the request was
wrong as sent (``BadRequest``), or the upstream could not be reached (``UpstreamFailed``).
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.providers import ANTHROPIC, Wire


class ProxyError(Exception):
    """An answer of keybroker's own, in the provider's error shape; raised before the
    response starts."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = tuple(headers)  # sent with the error: retry-after on a 429

    def body_in(self, wire: Wire = ANTHROPIC) -> bytes:
        return wire.error_body(self.status, self.error_type, self.message)

    @property
    def outcome(self) -> str:
        """The audit outcome of a call that ends with this answer."""
        raise NotImplementedError

    @property
    def denied(self) -> bool:
        """Whether keybroker said no: the audit's policy result is then "denied", with the
        message as its reason."""
        return self.outcome == "denied"

    @property
    def action(self) -> str:
        """The audit action of a call that ends with this answer."""
        return "proxy.request"


class BadRequest(ProxyError):
    """The request is wrong as sent: malformed (400), too large (413), or for a path the
    proxy does not serve (404). Audited as a denial: nothing went upstream."""

    @property
    def outcome(self) -> str:
        return "denied"


class UpstreamFailed(ProxyError):
    """The call was allowed but the upstream could not be reached (502) or did not answer
    in time (504)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(504 if timed_out else 502, "api_error", message)
        self.timed_out = timed_out

    @property
    def outcome(self) -> str:
        return "upstream_timeout" if self.timed_out else "upstream_unreachable"


class KeyInvalid(ProxyError):
    """Every key of the backend was found invalid by its last validation (issue 20, item
    1): the upstream would refuse the call with its own "invalid x-api-key", which an agent
    reads as its token being bad. Not retried: only an admin's rotation helps."""

    def __init__(self, backend: str) -> None:
        super().__init__(
            503,
            "api_error",
            f"backend {backend}'s key was found invalid by its last validation; an admin must "
            f"replace it (`manage.py backend rotate {backend}`, or the admin's Backends page)",
            headers=[(b"x-should-retry", b"false")],
        )

    @property
    def outcome(self) -> str:
        return "key_invalid"
