"""`POST /api/queries`: the request, its options, and one model per query type."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from api.models.base import (
    INFO_COMMANDS,
    JSON_OBJECT,
    OBJECT,
    QUERY_TYPE_NAMES,
    REQUIRED,
    CatalogName,
    Filter,
    Identifier,
    Model,
    Positions,
    Projection,
    collection_name,
    count,
    json_object,
    parse,
    parse_dateobs,
    plain,
    projection,
    query_filter,
    radius_in_rad,
    radius_unit,
    required,
    required_in_schema,
    sort_pairs,
)
from api.responses import BadRequest, Forbidden
from api.safety import check_safe, parse_json_arg
from kowalski.coords import RADIUS_TO_RAD

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
