"""Shared serializer building blocks for the REST API."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension
from rest_framework import serializers


class StrictInputSerializer(serializers.Serializer[Any]):
    """An input serializer that refuses fields it does not know, so typos fail loudly."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["unknown field"] for name in unknown})
        return super().to_internal_value(data)


class StrictInputScheme(OpenApiSerializerExtension):  # type: ignore[no-untyped-call]
    """The schema says what StrictInputSerializer does: a field it does not know is refused."""

    target_class = StrictInputSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["additionalProperties"] = False
        # drf-spectacular leaves out allow_empty=False, which refuses [] as surely as max_length.
        properties = schema.get("properties", {})
        for name, field in self.target.fields.items():
            if isinstance(field, serializers.ListField) and not field.allow_empty:
                properties.get(name, {}).setdefault("minItems", 1)
        return schema


class StrictCharField(serializers.CharField):
    """A string field that refuses numbers and booleans instead of quietly stringifying them."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictBooleanField(serializers.BooleanField):
    """JSON true or false only; DRF's own also takes "yes", 1 and "on"."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


def allow_invalid_field() -> StrictBooleanField:
    """Store a key the upstream refuses (by default it is refused with 422 key_invalid)."""
    return StrictBooleanField(
        default=False,
        help_text="store the key even when the upstream refuses it; by default an invalid "
        "key is a 422 `key_invalid` and nothing is saved",
    )
