"""Errors that services raise; the API, the admin and the CLI each render them their way."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400
    error_type = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found"


class Conflict(ServiceError):
    status_code = 409
    error_type = "conflict"


class Unauthenticated(ServiceError):
    status_code = 401
    error_type = "authentication_error"


class NotPermitted(ServiceError):
    status_code = 403
    error_type = "permission_denied"


class OAuthError(ServiceError):
    """An RFC 6749 error: OAuth clients parse ``error`` and ``error_description``."""

    def __init__(self, error: str, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.error_type = error
        self.status_code = status_code
