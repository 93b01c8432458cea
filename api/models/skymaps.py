"""`/api/skymap` bodies."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from api.models.base import (
    OBJECT,
    Model,
    parse_dateobs,
    parse_levels,
    plain_aliases,
    plain_triggerid,
)
from api.responses import BadRequest


class SkymapPut(Model):
    """`PUT /api/skymap` (admin): a skymap (or a VOEvent with one) and the contours to keep."""

    contours: Annotated[
        list[int | float],
        BeforeValidator(parse_levels),
        WithJsonSchema(
            {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "number"}]}
        ),
    ] = Field(default=None, validate_default=True)
    aliases: Annotated[
        list[str],
        BeforeValidator(plain_aliases),
        WithJsonSchema({"type": "array", "items": {"type": "string"}}),
    ] = Field(default=None, validate_default=True)
    triggerid: Annotated[
        Any,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
    ] = None
    dateobs: Annotated[
        dt.datetime | None, WithJsonSchema({"type": "string", "format": "date-time"})
    ] = None
    voevent: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    skymap: Annotated[
        Any,
        WithJsonSchema(
            {
                **OBJECT,
                "description": "{localization_name, and ra/dec/error, polygon, "
                "uniq/probdensity (multiorder) or url}",
            }
        ),
    ] = None

    @field_validator("triggerid", mode="before")
    @classmethod
    def _triggerid(cls, value: Any) -> Any:
        return None if value is None else plain_triggerid(value)

    @field_validator("dateobs", mode="before")
    @classmethod
    def _dateobs(cls, value: Any) -> dt.datetime | None:
        return None if value is None else parse_dateobs(value)

    @model_validator(mode="after")
    def _source(self) -> SkymapPut:
        if "voevent" not in self.model_fields_set and not isinstance(self.skymap, dict):
            raise BadRequest("either skymap dict or voevent is required in the request body")
        return self


class SkymapDelete(Model):
    """`DELETE /api/skymap` (admin): every identifier given must match."""

    localization_name: str
    dateobs: Annotated[Any, WithJsonSchema({"type": "string", "format": "date-time"})] = None
    triggerid: Annotated[
        Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]})
    ] = None
    alias: Annotated[Any, WithJsonSchema({"type": "string"})] = None
