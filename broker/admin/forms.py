"""What admin forms share: a service's refusal shown on the form fields it names."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from django import forms

from broker.infra.errors import ServiceError


def form_add_service_errors(
    form: forms.BaseForm, exc: ServiceError, fields: Mapping[str, str] | None = None
) -> None:
    """Put each of a service's problems on the form field it is about.

    ``fields`` maps the service's names to the form's where they differ (``secret`` ->
    ``new_secret``). A problem with an input the form has no field for goes on top of the
    form, with the service's name for it, so nothing is lost. A field whose own check had
    already failed gets nothing more: the service never saw what was typed there.
    """
    fields = fields or {}
    failed = set(form.errors)
    for field, texts in exc.errors.items():
        target = fields.get(field, field) if field is not None else None
        for text in texts:
            if target is not None and target in form.fields:
                if target not in failed:
                    form.add_error(target, text)
            else:
                form.add_error(None, f"{field}: {text}" if field else text)


@contextmanager
def service_checked(
    form: forms.BaseForm, fields: Mapping[str, str] | None = None
) -> Iterator[None]:
    """``with service_checked(form): backend_add_check(...)`` shows on the form what the
    check refuses, instead of raising."""
    try:
        yield
    except ServiceError as exc:
        form_add_service_errors(form, exc, fields)
