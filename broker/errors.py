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
