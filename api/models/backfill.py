"""`/api/filters/{filter_id}/backfill` and `/explain` bodies."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from api.models.base import (
    OBJECT,
    Model,
    required,
)
from api.models.filters import (
    RunMaxTimeMs,
    julian_date,
)
from api.responses import BadRequest
from kowalski import backfill

# ------------------------------------------------------------------ back-fill and explain

JD_OR_DATE: dict[str, Any] = {
    "anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}],
    "description": "JD or ISO date (UTC unless it says otherwise)",
}
DEFAULT_EXPLAIN_ALERTS = 1000


def optional_positive(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{field} must be a positive integer")
    return value


class BackfillCreate(Model):
    """`POST /api/filters/{filter_id}/backfill`: run a filter version over the archived alerts of
    `[start, end)` as a job (its passes go to `filter_backfill_passes`)."""

    start: Annotated[Any, WithJsonSchema(JD_OR_DATE)] = required()
    end: Annotated[Any, WithJsonSchema(JD_OR_DATE)] = required()
    fid: Annotated[str | None, WithJsonSchema({"type": "string"})] = None
    outputs: Annotated[
        list[str],
        WithJsonSchema(
            {"type": "array", "items": {"type": "string", "enum": list(backfill.OUTPUTS)}}
        ),
    ] = []
    max_alerts: Annotated[
        int | None,
        WithJsonSchema({"type": "integer", "minimum": 1}),
        BeforeValidator(lambda v: optional_positive(v, "max_alerts")),
    ] = None

    @field_validator("start", "end", mode="before")
    @classmethod
    def _date(cls, value: Any, info: ValidationInfo) -> float:
        if value is None:
            raise BadRequest(f"{info.field_name} is required (JD or ISO date)")
        return julian_date(value, str(info.field_name))

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
            raise BadRequest(f"outputs must be a list of {list(backfill.OUTPUTS)}")
        return value


class FilterExplain(Model):
    """`POST /api/filters/{filter_id}/explain`: a version (or a draft `pipeline`) run stage by
    stage on a sample: a `night`, a `start`/`end` range, or by default the latest alerts; at most
    `max_alerts` of them."""

    pipeline: Annotated[
        Any, WithJsonSchema({"anyOf": [{"type": "array", "items": OBJECT}, {"type": "string"}]})
    ] = None
    fid: Annotated[str | None, WithJsonSchema({"type": "string"})] = None
    night: Annotated[
        str | None, WithJsonSchema({"type": "string", "description": "YYYYMMDD or YYYY-MM-DD"})
    ] = None
    start: Annotated[Any, WithJsonSchema(JD_OR_DATE)] = None
    end: Annotated[Any, WithJsonSchema(JD_OR_DATE)] = None
    max_alerts: Annotated[
        int,
        WithJsonSchema({"type": "integer", "minimum": 1}),
        BeforeValidator(lambda v: optional_positive(v, "max_alerts")),
    ] = DEFAULT_EXPLAIN_ALERTS
    max_time_ms: RunMaxTimeMs = 30000

    @property
    def jd_range(self) -> tuple[float, float] | None:
        if self.night is not None:
            if self.start is not None or self.end is not None:
                raise BadRequest("give night, or start and end, not both")
            try:
                return backfill.night_range(self.night)
            except backfill.BackfillError as exc:
                raise BadRequest(str(exc)) from None
        if (self.start is None) != (self.end is None):
            raise BadRequest("start and end come as a pair")
        if self.start is None:
            return None
        first, last = julian_date(self.start, "start"), julian_date(self.end, "end")
        if last <= first:
            raise BadRequest("end must be after start")
        return first, last
