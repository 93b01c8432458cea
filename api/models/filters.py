"""`/api/filters` bodies: create, patch and test a filter."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from api.models.base import (
    OBJECT,
    Model,
    required,
    required_in_schema,
)
from api.models.users import (
    Flag,
)
from api.responses import BadRequest
from kowalski import backfill


def positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{field} must be an integer >= 1")
    return value


PositiveId = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1})]


STREAM_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "boolean"},
            {
                "type": "object",
                "properties": {
                    "active": {"type": "boolean"},
                    "cutouts": {"type": "boolean"},
                    "lightcurve": {"type": "boolean"},
                },
            },
        ],
        "description": "publish passes to the results stream (see README: Results stream)",
    }
)


class FilterCreate(Model):
    """`POST /api/filters` (admin): a new filter, or a new version of one."""

    group_id: PositiveId = required()
    filter_id: PositiveId = required()
    catalog: Annotated[str, WithJsonSchema({"type": "string"})] = required()
    permissions: Annotated[
        list[int], WithJsonSchema({"type": "array", "items": {"type": "integer"}})
    ] = Field(default_factory=list)
    pipeline: Annotated[Any, WithJsonSchema({"type": "array", "items": OBJECT, "minItems": 1})] = (
        required()
    )
    autosave: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "boolean"}, OBJECT]})] = False
    auto_followup: Annotated[Any, WithJsonSchema(OBJECT)] = Field(default_factory=dict)
    update_annotations: Flag = False
    stream: Annotated[Any, STREAM_SCHEMA] = False  # validated by api.filters.stream_option

    @field_validator("group_id", "filter_id", mode="before")
    @classmethod
    def _ids(cls, value: Any, info: ValidationInfo) -> int:
        return positive_int(value, str(info.field_name))

    @field_validator("catalog", mode="before")
    @classmethod
    def _catalog(cls, value: Any, info: ValidationInfo) -> str:
        catalogs = sorted((info.context or {}).get("catalogs", ()))
        if not isinstance(value, str) or value not in catalogs:
            raise BadRequest(f"catalog must be one of {catalogs}, got {value!r}")
        return value

    @field_validator("permissions", mode="before")
    @classmethod
    def _permissions(cls, value: Any) -> list[int]:
        if not isinstance(value, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in value
        ):
            raise BadRequest("permissions must be a list of integers (ZTF programids)")
        return value


FILTER_PATCH_KEYS = (
    "active",
    "active_fid",
    "autosave",
    "auto_followup",
    "update_annotations",
    "stream",
)


class FilterPatch(Model):
    """`PATCH /api/filters` (admin): only the keys given change."""

    model_config = ConfigDict(extra="allow", json_schema_extra=required_in_schema)

    filter_id: PositiveId = required()
    active: bool | None = None
    active_fid: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    autosave: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "boolean"}, OBJECT]})] = None
    auto_followup: Annotated[Any, WithJsonSchema(OBJECT)] = None
    update_annotations: Flag = False
    stream: Annotated[Any, STREAM_SCHEMA] = None  # validated by api.filters.stream_option

    @field_validator("filter_id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> int:
        return positive_int(value, "filter_id")

    @model_validator(mode="after")
    def _known_keys(self) -> FilterPatch:
        unknown = set(self.model_extra or {})
        if unknown:
            raise BadRequest(
                f"cannot modify {sorted(unknown)}; modifiable: {sorted(FILTER_PATCH_KEYS)}"
            )
        return self

    @field_validator("active", mode="before")
    @classmethod
    def _active(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise BadRequest("active must be a boolean")
        return value


def julian_date(value: Any, field: str) -> float:
    """A JD given as a number, or an ISO date (UTC unless it says otherwise)."""
    try:
        return backfill.julian_date(value, field)
    except backfill.BackfillError as exc:
        raise BadRequest(str(exc)) from None


MAX_TEST_OBJECTS = 1000
MAX_TEST_TIME_MS = 300_000
# Messages clients match on, worded as upstream Kowalski words them.
TEST_WINDOW_TOO_LONG = (
    "start_date and end_date must be within 1 day of each other if object_ids is not provided"
)
TEST_MAX_TIME_TOO_LARGE = f"max_time_ms must be less than 5 minutes (in ms: {MAX_TEST_TIME_MS})"


def bounded_max_time_ms(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("max_time_ms must be a positive integer (milliseconds)")
    if value > MAX_TEST_TIME_MS:
        raise BadRequest(TEST_MAX_TIME_TOO_LARGE)
    return value


# a test or explain run's max_time_ms: 1 ms to 5 minutes
RunMaxTimeMs = Annotated[
    int,
    BeforeValidator(bounded_max_time_ms),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_TEST_TIME_MS}),
]


class FilterTest(Model):
    """`POST /api/filters/{filter_id}/test` (admin): which archived alerts to run a version over
    (object_ids, or a window of at most a day, or both)."""

    filter_version: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    object_ids: Annotated[
        list[str] | None,
        WithJsonSchema(
            {"type": "array", "items": {"type": "string"}, "maxItems": MAX_TEST_OBJECTS}
        ),
    ] = None
    start_date: Annotated[Any, WithJsonSchema({"description": "JD or ISO date"})] = None
    end_date: Annotated[Any, WithJsonSchema({"description": "JD or ISO date"})] = Field(
        default=None, validate_default=True
    )
    max_time_ms: RunMaxTimeMs = 30000

    @field_validator("object_ids", mode="before")
    @classmethod
    def _object_ids(cls, value: Any) -> list[str] | None:
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(o, str) for o in value)
        ):
            raise BadRequest("object_ids must be a list of strings")
        if value and len(value) > MAX_TEST_OBJECTS:
            raise BadRequest(f"at most {MAX_TEST_OBJECTS} object_ids")
        return value

    @field_validator("end_date", mode="before")
    @classmethod
    def _window(cls, end: Any, info: ValidationInfo) -> Any:
        start = info.data.get("start_date")
        if (start is None) != (end is None):
            raise BadRequest("start_date and end_date come as a pair")
        if start is None:
            if not info.data.get("object_ids"):
                raise BadRequest("give object_ids and/or start_date + end_date")
            return None
        first, last = julian_date(start, "start_date"), julian_date(end, "end_date")
        if last <= first:
            raise BadRequest("end_date must be after start_date")
        if not info.data.get("object_ids") and last - first > 1.0:
            raise BadRequest(TEST_WINDOW_TOO_LONG)
        return end

    @property
    def jd_range(self) -> tuple[float, float] | None:
        if self.start_date is None:
            return None
        return julian_date(self.start_date, "start_date"), julian_date(self.end_date, "end_date")
