"""Errors that services raise; the API, the admin and the CLI each render them their way.

A problem with one input names it in ``field`` (the service's own argument name), so the
admin can put it on its form field and the API in its error body by field; ``message`` is
the whole sentence (``rpm: must be at least 1``) for surfaces that show one line.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager


def _sentence(errors: Mapping[str | None, Sequence[str]]) -> str:
    return "; ".join(
        f"{field}: {'; '.join(texts)}" if field else "; ".join(texts)
        for field, texts in errors.items()
    )


class ServiceError(Exception):
    status_code = 400
    error_type = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        self.text = message
        # Field (None: the request as a whole) -> what is wrong with it.
        self.errors: dict[str | None, list[str]] = {field: [message]}
        self.message = _sentence(self.errors)
        super().__init__(self.message)


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found"


class Conflict(ServiceError):
    status_code = 409
    error_type = "conflict"


class Unavailable(ServiceError):
    """A service this needs (Redis) does not answer: retry shortly."""

    status_code = 503
    error_type = "unavailable"


class Unauthenticated(ServiceError):
    status_code = 401
    error_type = "authentication_error"


class NotPermitted(ServiceError):
    status_code = 403
    error_type = "permission_denied"


class FieldErrors(ServiceError):
    """Several problems at once, each on its field: every one is named, none is saved.

    Its status and type are those of the first problem found (rules run in a fixed order),
    so a refusal that was a 403 or a 409 alone stays one next to other problems.
    """

    def __init__(self, problems: Sequence[ServiceError]) -> None:
        if not problems:
            raise ValueError("FieldErrors needs at least one problem")
        first = problems[0]
        super().__init__(first.text, first.field)
        self.status_code, self.error_type = first.status_code, first.error_type
        merged: dict[str | None, list[str]] = {}
        for problem in problems:
            for field, texts in problem.errors.items():
                merged.setdefault(field, []).extend(texts)
        self.errors = merged
        self.field = first.field if len(merged) == 1 else None
        self.message = _sentence(merged)
        self.args = (self.message,)

    @classmethod
    def on(cls, field: str, texts: Sequence[str]) -> FieldErrors:
        """Several problems with one field."""
        return cls([ServiceError(text, field) for text in texts])


class Problems:
    """Collects what each check refuses, so every problem with an input is named at once.

    ``with problems.check(): rule()`` records the rule's ServiceError instead of raising it;
    ``problems.raise_if_any()`` then raises it alone, or all of them as FieldErrors.
    """

    def __init__(self) -> None:
        self.found: list[ServiceError] = []

    def __bool__(self) -> bool:
        return bool(self.found)

    def fields(self) -> set[str | None]:
        return {field for problem in self.found for field in problem.errors}

    @contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except ServiceError as exc:
            self.found.append(exc)

    def add(self, message: str, field: str | None = None) -> None:
        self.found.append(ServiceError(message, field))

    def raise_if_any(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise FieldErrors(self.found)


class OAuthError(ServiceError):
    """An RFC 6749 error: OAuth clients parse ``error`` and ``error_description``."""

    def __init__(self, error: str, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.error_type = error
        self.status_code = status_code
