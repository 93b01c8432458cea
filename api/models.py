"""Typed request models: one per query type of `POST /api/queries` and per route body.

Every request is validated by its model before the first database call. Validators raise
`BadRequest` with the messages clients match on (pydantic lets exceptions other than
`ValueError`/`AssertionError` through unchanged); anything else pydantic refuses becomes a
`BadRequest` naming the field (`parse`). The same models give the OpenAPI request-body schemas
(`api/openapi.py`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from api.responses import BadRequest, Forbidden
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


# ------------------------------------------------------------------ POST /api/queries


class QueryOptions(Model):
    """`kwargs` of a query."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", populate_by_name=True, json_schema_extra=required_in_schema
    )

    max_time_ms: Annotated[
        int,
        WithJsonSchema({"type": "integer", "minimum": 1, "description": "default: the server's"}),
    ] = 0
    hint: Annotated[Any, WithJsonSchema({"description": "index name or key pattern"})] = None
    skip: Annotated[int | None, WithJsonSchema({"type": "integer", "minimum": 0})] = None
    limit: Annotated[int | None, WithJsonSchema({"type": "integer", "minimum": 0})] = None
    sort: Annotated[
        list[tuple[str, Any]] | None,
        WithJsonSchema({"description": '[[field, 1|-1], ...], {field: 1|-1} or "field"'}),
    ] = None
    allow_disk_use: Annotated[bool, BeforeValidator(bool)] = Field(True, alias="allowDiskUse")
    filter_first: Annotated[bool, BeforeValidator(bool)] = False

    @field_validator("max_time_ms", mode="before")
    @classmethod
    def _max_time_ms(cls, value: Any) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 1 <= value < 2**31
        ):
            raise BadRequest("kwargs.max_time_ms must be a positive number of milliseconds")
        return int(value)

    @field_validator("hint", mode="before")
    @classmethod
    def _hint(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            return sort_pairs(value, field="hint")
        return value

    @field_validator("skip", "limit", mode="before")
    @classmethod
    def _count(cls, value: Any, info: ValidationInfo) -> int | None:
        return count(value, f"kwargs.{info.field_name}")

    @field_validator("sort", mode="before")
    @classmethod
    def _sort(cls, value: Any) -> list[tuple[str, Any]] | None:
        return sort_pairs(value)

    @property
    def per_object(self) -> bool:
        return any(v is not None for v in (self.skip, self.limit, self.sort, self.hint))

    def paging(self) -> dict[str, Any]:
        """skip / limit / hint as given."""
        options: dict[str, Any] = {}
        if self.skip is not None:
            options["skip"] = self.skip
        if self.limit is not None:
            options["limit"] = self.limit
        if self.hint is not None:
            options["hint"] = self.hint
        return options


def query_options(kwargs: Any, default_max_time_ms: int) -> QueryOptions:
    data = json_object(kwargs or {}, "kwargs")
    data.setdefault("max_time_ms", default_max_time_ms)
    return parse(QueryOptions, data)


class QueryRequest(Model):
    """The body of `POST /api/queries`."""

    query_type: Literal[QUERY_TYPE_NAMES]  # type: ignore[valid-type]
    query: Annotated[dict[str, Any], WithJsonSchema(JSON_OBJECT)] = Field(default_factory=dict)
    kwargs: Annotated[Any, WithJsonSchema(QueryOptions.model_json_schema(by_alias=True))] = None

    @field_validator("query_type", mode="before")
    @classmethod
    def _query_type(cls, value: Any) -> str:
        if not isinstance(value, str) or value not in QUERY_TYPE_NAMES:
            raise BadRequest(f"query_type must be one of {sorted(QUERY_TYPE_NAMES)}, got {value!r}")
        return value

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any) -> dict[str, Any]:
        return json_object(value, "query")


class CatalogQuery(Model):
    catalog: CatalogName = required()


class FilteredQuery(CatalogQuery):
    filter: Filter = Field(default_factory=dict)
    projection: Projection = None


class RequiredFilterQuery(FilteredQuery):
    filter: Filter = Field(default_factory=dict, json_schema_extra={REQUIRED: True})

    @model_validator(mode="before")
    @classmethod
    def _filter_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and "catalog" in data and "filter" not in data:
            collection_name(data["catalog"], "query.catalog")
            raise BadRequest("query.filter is required (use {} to match everything)")
        return data


class FindQuery(RequiredFilterQuery):
    """find / find_one: documents of `catalog` matching `filter`."""


class CountQuery(RequiredFilterQuery):
    """count_documents: documents of `catalog` matching `filter` (skip/limit apply)."""


class EstimatedCountQuery(CatalogQuery):
    """estimated_document_count: documents of `catalog` (the user may see)."""


class DropQuery(CatalogQuery):
    """drop (admins only): remove `catalog`."""


class AggregateQuery(CatalogQuery):
    """aggregate: run `pipeline` on `catalog`."""

    pipeline: Annotated[
        list[dict[str, Any]],
        WithJsonSchema({"type": "array", "items": OBJECT, "minItems": 1}),
    ] = required()

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pipeline(cls, value: Any) -> list[dict[str, Any]]:
        pipeline = parse_json_arg(value, "query.pipeline")
        if not isinstance(pipeline, list) or not pipeline:
            raise BadRequest("query.pipeline must be a non-empty list of stages")
        if not all(isinstance(stage, dict) and len(stage) == 1 for stage in pipeline):
            raise BadRequest(
                "query.pipeline: each stage must be an object with exactly one operator"
            )
        check_safe(pipeline, "query.pipeline")
        if any("$unionWith" in stage for stage in pipeline):
            raise Forbidden("Forbidden: query.pipeline uses $unionWith, which queries may not use")
        return pipeline


class InfoQuery(Model):
    """info: catalog_names, catalog_info, index_info (with `catalog`) or db_info."""

    command: Annotated[
        Literal[INFO_COMMANDS],  # type: ignore[valid-type]
        WithJsonSchema({"type": "string", "enum": list(INFO_COMMANDS)}),
    ] = required()
    catalog: Annotated[Any, WithJsonSchema({"type": "string"})] = None

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, value: Any) -> str:
        if not isinstance(value, str) or value not in INFO_COMMANDS:
            raise BadRequest(f"query.command must be one of {', '.join(INFO_COMMANDS)}")
        return value

    @model_validator(mode="after")
    def _catalog(self) -> InfoQuery:
        if self.command in ("catalog_info", "index_info"):
            self.catalog = collection_name(self.catalog, "query.catalog")
        return self


class CatalogSpec(Model):
    """What to return from one catalog of a positional query."""

    filter: Filter = Field(default_factory=dict)
    projection: Projection = None


def catalog_specs(value: Any) -> dict[str, CatalogSpec]:
    catalogs = parse_json_arg(value, "query.catalogs")
    if not isinstance(catalogs, dict) or not catalogs:
        raise BadRequest("query.catalogs must be an object {catalog: {filter, projection}}")
    out = {}
    for name, spec in catalogs.items():
        collection_name(name, f"query.catalogs.{name}")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise BadRequest(f"query.catalogs.{name} must be an object")
        flt = query_filter(spec["filter"]) if "filter" in spec else {}
        shown = projection(spec.get("projection"), f"query.catalogs.{name}.projection")
        out[name] = CatalogSpec.model_construct(filter=flt, projection=shown)
    return out


Catalogs = Annotated[
    dict[str, CatalogSpec],
    BeforeValidator(catalog_specs),
    WithJsonSchema(
        {
            "type": "object",
            "description": "{catalog: {filter, projection}}",
            "additionalProperties": CatalogSpec.model_json_schema(),
            "minProperties": 1,
        }
    ),
]


class ObjectCoordinates(Model):
    cone_search_unit: Literal["arcsec", "arcmin", "deg", "rad"] = "arcsec"
    cone_search_radius: Annotated[float, WithJsonSchema({"type": "number", "minimum": 0})] = (
        required()
    )
    radec: Positions = required()

    @field_validator("cone_search_unit", mode="before")
    @classmethod
    def _unit(cls, value: Any) -> str:
        radius_in_rad(0, value, "query.object_coordinates.cone_search_radius")
        return str(value)

    @field_validator("cone_search_radius", mode="before")
    @classmethod
    def _radius(cls, value: Any, info: ValidationInfo) -> float:
        unit = info.data.get("cone_search_unit", "arcsec")
        radius_in_rad(value, unit, "query.object_coordinates.cone_search_radius")
        return float(value)

    @property
    def radius_rad(self) -> float:
        return self.cone_search_radius * RADIUS_TO_RAD[self.cone_search_unit]


class ConeSearchQuery(Model):
    """cone_search: per catalog and object, the documents within the radius."""

    object_coordinates: Annotated[
        ObjectCoordinates,
        BeforeValidator(lambda v: json_object(v, "query.object_coordinates")),
    ] = required()
    catalogs: Catalogs = required()


class NearQuery(Model):
    """near: per catalog and object, the documents between min and max distance, nearest first."""

    distance_units: Annotated[Any, WithJsonSchema({"enum": sorted(RADIUS_TO_RAD)})] = "rad"
    min_distance: Annotated[float, WithJsonSchema({"type": "number", "minimum": 0})] = Field(
        default=0, validate_default=True
    )
    max_distance: Annotated[float | None, WithJsonSchema({"type": "number", "minimum": 0})] = None
    radec: Positions = required()
    catalogs: Catalogs = required()

    @field_validator("min_distance", "max_distance", mode="before")
    @classmethod
    def _distance(cls, value: Any, info: ValidationInfo) -> float:
        field = f"query.{info.field_name}"
        units = radius_unit(info.data.get("distance_units"), field)
        return radius_in_rad(value, units, field) / RADIUS_TO_RAD[units]

    @model_validator(mode="after")
    def _max_not_below_min(self) -> NearQuery:
        if self.max_rad < self.min_rad:
            raise BadRequest("query.max_distance must not be smaller than query.min_distance")
        return self

    @property
    def min_rad(self) -> float:
        return self.min_distance * RADIUS_TO_RAD[self.distance_units]

    @property
    def max_rad(self) -> float:
        if self.max_distance is None:
            return RADIUS_TO_RAD["arcmin"]
        return self.max_distance * RADIUS_TO_RAD[self.distance_units]


class SkymapSelector(Model):
    """Which stored skymap: its name and one of dateobs, trigger_id or aliases."""

    localization_name: Identifier
    dateobs: Annotated[Any, WithJsonSchema({"type": "string", "format": "date-time"})] = None
    trigger_id: Identifier | None = Field(
        default=None, validation_alias=AliasChoices("trigger_id", "triggerid")
    )
    aliases: list[Identifier] = Field(default_factory=list)
    contour: Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 100})] = 90

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, spec: Any) -> Any:
        """In upstream's order, with its messages."""
        if not isinstance(spec, dict) or not spec.get("localization_name"):
            raise BadRequest("query.skymap.localization_name is required")
        out: dict[str, Any] = {}
        if spec.get("dateobs"):
            out["dateobs"] = parse_dateobs(spec["dateobs"])
        trigger = spec.get("trigger_id", spec.get("triggerid"))
        if trigger is not None:
            out["trigger_id"] = plain(trigger, "query.skymap.trigger_id")
        if spec.get("aliases"):
            aliases = spec["aliases"] if isinstance(spec["aliases"], list) else [spec["aliases"]]
            out["aliases"] = [plain(a, "query.skymap.aliases") for a in aliases]
        if not out:
            raise BadRequest("query.skymap needs dateobs, trigger_id or aliases")
        contour = spec.get("contour", 90)
        if isinstance(contour, bool) or not isinstance(contour, int) or not 0 < contour <= 100:
            raise BadRequest("query.skymap.contour must be an integer percentage")
        out["contour"] = contour
        out["localization_name"] = plain(
            spec["localization_name"], "query.skymap.localization_name"
        )
        return out

    def selector(self) -> dict[str, Any]:
        """The skymaps query."""
        alternatives: list[dict[str, Any]] = []
        if self.dateobs is not None:
            alternatives.append({"dateobs": self.dateobs})
        if self.trigger_id is not None:
            alternatives.append({"triggerid": self.trigger_id})
        if self.aliases:
            alternatives.append({"aliases": {"$in": self.aliases}})
        return {"localization_name": self.localization_name, "$or": alternatives}

    @property
    def contour_key(self) -> str:
        return f"contour{self.contour}"


class SkymapQuery(Model):
    """skymap: documents of `catalog` inside a stored skymap's credible-level contour."""

    skymap: SkymapSelector = required()
    catalog: CatalogName = required()
    filter: Filter = Field(default_factory=dict)
    projection: Projection = None


QUERY_MODELS: dict[str, type[Model]] = {
    "find": FindQuery,
    "find_one": FindQuery,
    "count_documents": CountQuery,
    "estimated_document_count": EstimatedCountQuery,
    "aggregate": AggregateQuery,
    "info": InfoQuery,
    "cone_search": ConeSearchQuery,
    "near": NearQuery,
    "skymap": SkymapQuery,
    "drop": DropQuery,
}


# ------------------------------------------------------------------ route bodies


class AuthRequest(Model):
    """`POST /api/auth`: username and password (penquins adds its version)."""

    username: Annotated[str, WithJsonSchema({"type": "string"})] = required()
    password: Annotated[str, WithJsonSchema({"type": "string"})] = required()
    penquins_version: Any = Field(default=None, alias="penquins.__version__")

    @field_validator("username", "password", mode="before")
    @classmethod
    def _given(cls, value: Any, info: ValidationInfo) -> str:
        if not value or not isinstance(value, str):
            raise BadRequest(f"missing {info.field_name}")
        return value


def permissions(value: Any) -> dict[str, list[int]]:
    """`{"ZTF": [1, 2]}`: survey -> programids this user may see."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest('permissions must be an object like {"ZTF": [1, 2]}')
    out: dict[str, list[int]] = {}
    for survey, ids in value.items():
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 3 for i in ids
        ):
            raise BadRequest(f"permissions.{survey} must be a list of programids in 0..3")
        out[str(survey)] = sorted(set(ids))
    return out


Permissions = Annotated[
    dict[str, list[int]],
    BeforeValidator(permissions),
    WithJsonSchema(
        {
            "type": "object",
            "description": 'programids per survey, e.g. {"ZTF": [1, 2]}',
            "additionalProperties": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 3},
            },
        }
    ),
]
Flag = Annotated[bool, BeforeValidator(bool), WithJsonSchema({"type": "boolean"})]


class UserCreate(Model):
    """`POST /api/users` (admin)."""

    username: str
    password: str
    email: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    permissions: Permissions = Field(default=None, validate_default=True)
    admin: Flag = False

    @model_validator(mode="before")
    @classmethod
    def _credentials(cls, data: Any) -> Any:
        given = data if isinstance(data, dict) else {}
        username, password = given.get("username"), given.get("password")
        if (
            not isinstance(username, str)
            or not username
            or not isinstance(password, str)
            or not password
        ):
            raise BadRequest("username and password must be set")
        return data


class UserUpdate(Model):
    """`PUT /api/users/{username}` (admin): only the keys given change."""

    username: Annotated[Any, WithJsonSchema({"type": "string", "description": "new name"})] = None
    password: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    email: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    permissions: Permissions = Field(default_factory=dict)
    admin: Flag = False


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
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"{field} must be a JD or an ISO date, got {value!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.timestamp() / 86400.0 + 2440587.5
    raise BadRequest(f"{field} must be a JD or an ISO date")


MAX_TEST_OBJECTS = 1000
MAX_TEST_TIME_MS = 300_000
# Messages clients match on, worded as upstream Kowalski words them.
TEST_WINDOW_TOO_LONG = (
    "start_date and end_date must be within 1 day of each other if object_ids is not provided"
)
TEST_MAX_TIME_TOO_LARGE = f"max_time_ms must be less than 5 minutes (in ms: {MAX_TEST_TIME_MS})"


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
    max_time_ms: Annotated[
        int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_TEST_TIME_MS})
    ] = 30000

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

    @field_validator("max_time_ms", mode="before")
    @classmethod
    def _max_time_ms(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest("max_time_ms must be a positive integer (milliseconds)")
        if value > MAX_TEST_TIME_MS:
            raise BadRequest(TEST_MAX_TIME_TOO_LARGE)
        return value

    @property
    def jd_range(self) -> tuple[float, float] | None:
        if self.start_date is None:
            return None
        return julian_date(self.start_date, "start_date"), julian_date(self.end_date, "end_date")


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


LABEL_KINDS = ("human_labels", "ml_scores")
Labels = dict[str, dict[str, float]]  # kind -> label -> score


def scores(value: Any, field: str) -> dict[str, float]:
    """{label: score} | [labels] | "a,b" -> {label: score}; lists/strings mean score 1.0."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        value = dict.fromkeys(map(str, value), 1.0)
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object, a list or a comma-separated string")
    out = {}
    for label, score in value.items():
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise BadRequest(f"{field}.{label} must be a number")
        if "." in label or label.startswith("$"):
            raise BadRequest(f"{field}: invalid label {label!r}")
        out[label] = float(score)
    return out


def candid_keys(body: Any) -> list[int]:
    try:
        return [int(c) for c in body]
    except (TypeError, ValueError):
        raise BadRequest("keys of the body must be candids (integers)") from None


class ClassificationsPut(RootModel[dict[int, Labels]]):
    """`PUT /api/classifications/{survey}` (admin): `{candid: {human_labels, ml_scores}}`, each
    `{label: score}`, a list of labels or "a,b" (score 1), merged into the stored labels."""

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, body: Any) -> dict[int, Labels]:
        out: dict[int, Labels] = {}
        for key, candid in zip(body, candid_keys(body), strict=True):
            entry = body[key]
            if not isinstance(entry, dict) or not set(entry) <= set(LABEL_KINDS):
                raise BadRequest(f"{key} must be an object with keys among {list(LABEL_KINDS)}")
            out[candid] = {k: scores(entry.get(k, {}), f"{key}.{k}") for k in LABEL_KINDS}
        return out


class ClassificationsDelete(RootModel[dict[int, dict[str, list[str]]]]):
    """`DELETE /api/classifications/{survey}` (admin): `{candid: {human_labels: [labels],
    ml_scores: [labels]}}` removes those labels."""

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, body: Any) -> dict[int, dict[str, list[str]]]:
        out: dict[int, dict[str, list[str]]] = {}
        for key, candid in zip(body, candid_keys(body), strict=True):
            entry = body[key]
            if not isinstance(entry, dict):
                raise BadRequest(f"{key} must be an object")
            out[candid] = {
                k: [label for label in (entry.get(k) or []) if isinstance(label, str)]
                for k in LABEL_KINDS
            }
        return out


TRIGGERS: tuple[type[Model], ...] = (TooTrigger, MmaTrigger)


class SkymapDelete(Model):
    """`DELETE /api/skymap` (admin): every identifier given must match."""

    localization_name: str
    dateobs: Annotated[Any, WithJsonSchema({"type": "string", "format": "date-time"})] = None
    triggerid: Annotated[
        Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]})
    ] = None
    alias: Annotated[Any, WithJsonSchema({"type": "string"})] = None
