"""`/api/triggers/*` bodies: ZTF ToO and MMA triggers."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from api.models.base import (
    OBJECT,
    Model,
    number,
    required,
    text,
)
from api.responses import BadRequest


class TooTrigger(Model):
    """`PUT /api/triggers/ztf[.test]`: a ToO queue for the ZTF scheduler."""

    queue_name: str = required()
    user: str = required()
    validity_window_mjd: Annotated[
        tuple[float, float],
        WithJsonSchema({"type": "array", "items": {"type": "number"}, "minItems": 2}),
    ] = required()
    targets: Annotated[
        list[dict[str, Any]], WithJsonSchema({"type": "array", "items": OBJECT, "minItems": 1})
    ] = required()

    @field_validator("queue_name", "user", mode="before")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> str:
        return text(value, str(info.field_name))

    @field_validator("validity_window_mjd", mode="before")
    @classmethod
    def _window(cls, value: Any) -> tuple[float, float]:
        if not isinstance(value, list) or len(value) != 2:
            raise BadRequest("validity_window_mjd must be [start, end] (MJD)")
        start, end = (number(v, "validity_window_mjd") for v in value)
        if end <= start:
            raise BadRequest("validity_window_mjd: end must be after start")
        return start, end

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not value:
            raise BadRequest("targets must be a non-empty list")
        for i, target in enumerate(value):
            if not isinstance(target, dict):
                raise BadRequest(f"targets[{i}] must be an object")
            missing = TOO_TARGET_KEYS - set(target)
            if missing:
                raise BadRequest(f"targets[{i}] is missing {sorted(missing)}")
        return value


TOO_TARGET_KEYS = {
    "request_id",
    "program_id",
    "field_id",
    "ra",
    "dec",
    "filter_id",
    "exposure_time",
    "program_pi",
    "subprogram_name",
}


class MmaTrigger(Model):
    """`PUT /api/triggers/ztfmma[.test]`: an MMA skymap trigger for the ZTF scheduler."""

    trigger_name: str = required()
    user: str = required()
    trigger_time: Annotated[float, WithJsonSchema({"type": "number"})] = required()
    fields: Annotated[
        list[dict[str, Any]],
        WithJsonSchema(
            {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["field_id", "probability"],
                    "properties": {
                        "field_id": {"type": "integer"},
                        "probability": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                },
            }
        ),
    ] = required()

    @field_validator("trigger_name", "user", mode="before")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> str:
        return text(value, str(info.field_name))

    @field_validator("trigger_time", mode="before")
    @classmethod
    def _time(cls, value: Any) -> float:
        return number(value, "trigger_time")

    @field_validator("fields", mode="before")
    @classmethod
    def _fields(cls, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not value:
            raise BadRequest("fields must be a non-empty list of {field_id, probability}")
        for i, item in enumerate(value):
            if not isinstance(item, dict) or "field_id" not in item:
                raise BadRequest(f"fields[{i}] must be an object with field_id and probability")
            probability = number(item.get("probability"), f"fields[{i}].probability")
            if not 0 <= probability <= 1:
                raise BadRequest(f"fields[{i}].probability must be in [0, 1]")
        return value


class TriggerDelete(Model):
    """`DELETE /api/triggers/{kind}`: the queue (`queue_name`) or trigger (`trigger_name`)."""

    queue_name: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    trigger_name: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    user: Annotated[Any, WithJsonSchema({"type": "string"})] = None
