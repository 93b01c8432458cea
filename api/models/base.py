"""Shared pieces of the request models: the base model, `parse`, and the checks many bodies use."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)

from api.responses import BadRequest
from api.safety import check_safe, parse_json_arg
from kowalski.coords import RADIUS_TO_RAD, parse_dec, parse_ra

M = TypeVar("M", bound=BaseModel)
DEFAULT_CONTOURS = [90, 95]  # credible levels (%) kept when a skymap comes without `contours`
MAX_COLLECTION_NAME = 255
QUERY_TYPE_NAMES = (
    "find",
    "find_one",
    "count_documents",
    "estimated_document_count",
    "aggregate",
    "info",
    "cone_search",
    "near",
    "skymap",
    "drop",
)
INFO_COMMANDS = ("catalog_names", "catalog_info", "index_info", "db_info")
OBJECT: dict[str, Any] = {"type": "object"}
JSON_OBJECT: dict[str, Any] = {
    "anyOf": [OBJECT, {"type": "string", "description": "the object as (Extended) JSON"}]
}


REQUIRED = "x-kowalski-required"


def required() -> Any:
    """A field every request gives: when missing, its validator still runs (on None), so that
    the answer is the API's own message; the schema lists it as required."""
    return Field(default=None, validate_default=True, json_schema_extra={REQUIRED: True})


def required_in_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """`required` as the OpenAPI document shows it."""
    names = [f.alias or n for n, f in model.model_fields.items() if f.is_required()]
    for name, prop in schema.get("properties", {}).items():
        if isinstance(prop, dict) and prop.pop(REQUIRED, False):
            names.append(name)
    if names:
        schema["required"] = names


class Model(BaseModel):
    """Request models ignore keys they do not know (upstream clients send extra ones)."""

    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, json_schema_extra=required_in_schema
    )


def parse(model: type[M], data: Any, **context: Any) -> M:
    """`data` validated as `model`; refusals become 400s that say which field is wrong."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request body"
        raise BadRequest(f"{where}: {first['msg']}") from None


# ------------------------------------------------------------------ shared checks


def collection_name(value: Any, field: str) -> str:
    """A valid MongoDB collection name (who may read it is `api/policy.py`'s question)."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field} must be a collection name")
    if (
        len(value) > MAX_COLLECTION_NAME
        or value.startswith((".", "system."))
        or ".." in value
        or any(c in value for c in "\x00$")
    ):
        raise BadRequest(f"{field}: invalid collection name {value!r}")
    return value


def json_object(value: Any, field: str) -> dict[str, Any]:
    """An object, given as one or as (Extended) JSON text."""
    parsed = parse_json_arg(value, field)
    if not isinstance(parsed, dict):
        raise BadRequest(f"{field} must be an object")
    return dict(parsed)


def query_filter(value: Any, field: str = "query.filter") -> dict[str, Any]:
    flt = json_object(value, field)
    check_safe(flt, field)
    return flt


def projection(value: Any, field: str = "query.projection") -> dict[str, Any] | None:
    parsed = parse_json_arg(value, field)
    if parsed in (None, {}):
        return None
    if not isinstance(parsed, dict):
        raise BadRequest(f"{field} must be an object")
    check_safe(parsed, field)
    return parsed


def count(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise BadRequest(f"{field} must be a non-negative integer")
    return value


def number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{field} must be a number")
    return float(value)


def text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field} must be a non-empty string")
    return value


def plain(value: Any, field: str) -> Any:
    """An identifier given as a plain value (string or number), never an operator object."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"{field} must be a string or a number")
    return value


def sort_pairs(value: Any, field: str = "sort") -> list[tuple[str, Any]] | None:
    """`[[field, dir], ...]` (documented), `{field: dir}` (SkyPortal) or `"field"`."""
    value = parse_json_arg(value, f"kwargs.{field}")
    if value is None:
        return None
    if isinstance(value, str):
        return [(value, 1)]
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, list):
        raise BadRequest(f"kwargs.{field} must be a list of [field, direction] pairs or a mapping")
    out = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not isinstance(pair[0], str):
            raise BadRequest(f"kwargs.{field}: each item must be [field, direction], got {pair!r}")
        direction = pair[1]
        if direction in ("asc", "ascending"):
            direction = 1
        elif direction in ("desc", "descending"):
            direction = -1
        if direction not in (1, -1) and not isinstance(direction, str):
            raise BadRequest(f"kwargs.{field}: direction of {pair[0]!r} must be 1 or -1")
        out.append((pair[0], direction))
    return out


def radius_unit(unit: Any, field: str) -> str:
    """`unit` if it is a known angle unit (a key of `RADIUS_TO_RAD`)."""
    if not isinstance(unit, str) or unit not in RADIUS_TO_RAD:
        raise BadRequest(f"{field} unit must be one of {sorted(RADIUS_TO_RAD)}, got {unit!r}")
    return unit


def radius_in_rad(value: Any, unit: Any, field: str) -> float:
    unit = radius_unit(unit, field)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise BadRequest(f"{field} must be a finite non-negative number")
    return float(value) * RADIUS_TO_RAD[unit]


def radec(value: Any) -> dict[str, tuple[float, float]]:
    """Named positions from `{name: [ra, dec]}`, `[[ra, dec], ...]` or a string of either / "ra dec"."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in "[{(":
            try:
                value = json.loads(stripped.replace("(", "[").replace(")", "]"))
            except (json.JSONDecodeError, RecursionError) as exc:
                raise BadRequest(f"radec: cannot parse {stripped!r}: {exc}") from None
        else:
            parts = stripped.replace(",", " ").split()
            if len(parts) != 2:
                raise BadRequest(f"radec: expected 'ra dec', got {stripped!r}")
            value = {stripped.replace(".", "_"): parts}
    if isinstance(value, list):
        pairs = value if value and isinstance(value[0], list | tuple) else [value]
        value = {str(list(p)).replace(".", "_"): p for p in pairs}
    if not isinstance(value, dict) or not value:
        raise BadRequest("radec must be {name: [ra, dec]}, a list of [ra, dec] or a string")
    out: dict[str, tuple[float, float]] = {}
    for name, pair in value.items():
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise BadRequest(f"radec.{name}: expected [ra, dec], got {pair!r}")
        try:
            out[str(name).replace(".", "_")] = (parse_ra(pair[0]), parse_dec(pair[1]))
        except ValueError as exc:
            raise BadRequest(f"radec.{name}: {exc}") from None
    return out


def plain_triggerid(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest("triggerid must be an integer or a string")
    return value


def plain_aliases(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise BadRequest("aliases must be a string or a list of strings")
    return list(value)


def parse_dateobs(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if not isinstance(value, str):
        raise BadRequest("dateobs must be an ISO date string like 2023-01-01T00:00:00")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"dateobs: cannot parse {value!r}") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment


def parse_levels(value: Any) -> list[int | float]:
    if value is None:
        return list(DEFAULT_CONTOURS)
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        value = [value]
    levels: set[float] = set()
    for v in value:
        try:
            if isinstance(v, bool) or not isinstance(v, int | float | str):
                raise ValueError(v)
            levels.add(float(v))
        except ValueError:
            raise BadRequest("contours must be numbers in (0, 100]") from None
    if not levels or not all(0 < v <= 100 for v in levels):
        raise BadRequest("contours must be numbers in (0, 100]")
    return [int(v) if v.is_integer() else v for v in sorted(levels)]


CatalogName = Annotated[
    str,
    BeforeValidator(lambda v: collection_name(v, "query.catalog")),
    WithJsonSchema({"type": "string", "description": "collection name"}),
]
Filter = Annotated[
    dict[str, Any],
    BeforeValidator(query_filter),
    WithJsonSchema({**JSON_OBJECT, "description": "MongoDB filter"}),
]
Projection = Annotated[
    dict[str, Any] | None,
    BeforeValidator(projection),
    WithJsonSchema({**JSON_OBJECT, "description": "MongoDB projection"}),
]
Positions = Annotated[
    dict[str, tuple[float, float]],
    BeforeValidator(radec),
    WithJsonSchema(
        {
            "description": '{name: [ra, dec]}, [[ra, dec], ...], or "ra dec" (degrees or '
            "sexagesimal)",
            "anyOf": [OBJECT, {"type": "array"}, {"type": "string"}],
        }
    ),
]
Identifier = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}]})]
