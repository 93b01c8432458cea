"""POST /api/queries: find, find_one, count_documents, estimated_document_count, aggregate, info,
cone_search, near, skymap, drop, with upstream request/response shapes.

Better than upstream: per-user ZTF programid permissions on alerts and their history, applied
before the user's filter and stages in every query type (`api/policy.py`); JavaScript, write and
administration operators refused at any depth, and regular expressions with nested quantifiers;
all input validated before the first database call; every database call bounded by a wall-clock
deadline of `max_time_ms` (plus a small grace) on the API side, whatever the server does with
`maxTimeMS`; at most `misc.max_concurrent_queries` queries per user at a time per worker;
`drop` admin-only; `find_one` honours `projection`; `count_documents` honours skip/limit;
cone/near searches run concurrently; large results stream.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pymongo.asynchronous.database import AsyncDatabase

from api.auth import read_body
from api.policy import DataRights, data_rights
from api.responses import BadRequest, Forbidden, NotFound, TooManyRequests, stream_list, success
from api.safety import check_safe, parse_json_arg
from kowalski import cones
from kowalski.config import Config
from kowalski.coords import RADIUS_TO_RAD, parse_dec, parse_ra

MESSAGE = "Successfully executed query"
STREAM_AFTER = 500  # documents: larger results are streamed
CONE_CONCURRENCY = 16
EARTH_RADIUS_M = 6378100.0  # MongoDB's sphere for GeoJSON distances
DEADLINE_GRACE_S = 0.5  # the server's own maxTimeMS usually answers first
T = TypeVar("T")


@dataclass(frozen=True)
class QueryOptions:
    """`kwargs`, validated once before anything runs."""

    max_time_ms: int
    skip: int | None = None
    limit: int | None = None
    sort: list[tuple[str, int]] | None = None
    hint: Any = None
    allow_disk_use: bool = True
    filter_first: bool = False

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


def count_kwarg(kwargs: dict[str, Any], name: str) -> int | None:
    value = kwargs.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise BadRequest(f"kwargs.{name} must be a non-negative integer")
    return value


def parse_options(kwargs: dict[str, Any], cfg: Config) -> QueryOptions:
    max_time_ms = kwargs.get("max_time_ms", cfg.misc.max_time_ms)
    if (
        isinstance(max_time_ms, bool)
        or not isinstance(max_time_ms, int | float)
        or not math.isfinite(max_time_ms)
        or not 1 <= max_time_ms < 2**31
    ):
        raise BadRequest("kwargs.max_time_ms must be a positive number of milliseconds")
    hint = kwargs.get("hint")
    if hint is not None and not isinstance(hint, str):
        hint = parse_sort(hint, field="hint")
    return QueryOptions(
        max_time_ms=int(max_time_ms),
        skip=count_kwarg(kwargs, "skip"),
        limit=count_kwarg(kwargs, "limit"),
        sort=parse_sort(kwargs.get("sort")),
        hint=hint,
        allow_disk_use=bool(kwargs.get("allowDiskUse", True)),
        filter_first=bool(kwargs.get("filter_first", False)),
    )


@dataclass
class QueryContext:
    request: web.Request
    cfg: Config
    db: AsyncDatabase[dict[str, Any]]
    rights: DataRights
    options: QueryOptions

    @property
    def max_time_ms(self) -> int:
        return self.options.max_time_ms

    @property
    def comment(self) -> str:
        return self.rights.user.username

    def cursor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_time_ms": self.max_time_ms, "comment": self.comment}
        options.update(self.options.paging())
        if self.options.sort is not None:
            options["sort"] = self.options.sort
        return options

    def aggregate_options(self) -> dict[str, Any]:
        return {"maxTimeMS": self.max_time_ms, "comment": self.comment}

    async def bounded(self, work: Awaitable[T]) -> T:
        """`work` (one database call) cancelled at the query's wall-clock deadline, so the API
        answers 400 even when the server does not honour maxTimeMS in time."""
        try:
            async with asyncio.timeout(self.max_time_ms / 1000 + DEADLINE_GRACE_S) as deadline:
                return await work
        except TimeoutError:
            if deadline.expired():
                raise BadRequest(f"query exceeded max_time_ms ({self.max_time_ms} ms)") from None
            raise


def parse_sort(value: Any, field: str = "sort") -> list[tuple[str, int]] | None:
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


def get_filter(query: dict[str, Any], required: bool = True) -> dict[str, Any]:
    if "filter" not in query:
        if required:
            raise BadRequest("query.filter is required (use {} to match everything)")
        return {}
    flt = parse_json_arg(query["filter"], "query.filter")
    if not isinstance(flt, dict):
        raise BadRequest("query.filter must be an object")
    check_safe(flt, "query.filter")
    return flt


def get_projection(query: dict[str, Any], field: str = "query.projection") -> dict[str, Any] | None:
    projection = parse_json_arg(query.get("projection"), field)
    if projection in (None, {}):
        return None
    if not isinstance(projection, dict):
        raise BadRequest(f"{field} must be an object")
    check_safe(projection, field)
    return projection


def get_pipeline(ctx: QueryContext, query: dict[str, Any]) -> list[dict[str, Any]]:
    pipeline = parse_json_arg(query.get("pipeline"), "query.pipeline")
    if not isinstance(pipeline, list) or not pipeline:
        raise BadRequest("query.pipeline must be a non-empty list of stages")
    if not all(isinstance(stage, dict) and len(stage) == 1 for stage in pipeline):
        raise BadRequest("query.pipeline: each stage must be an object with exactly one operator")
    check_safe(pipeline, "query.pipeline")
    if any("$unionWith" in stage for stage in pipeline):
        raise Forbidden("Forbidden: query.pipeline uses $unionWith, which queries may not use")
    ctx.rights.check_joins(pipeline)
    return pipeline


# ------------------------------------------------------------------ result helpers


async def first_batch(cursor: Any) -> tuple[list[Any], bool]:
    """Up to STREAM_AFTER + 1 documents, and whether there are more."""
    first: list[Any] = []
    async for doc in cursor:
        first.append(doc)
        if len(first) > STREAM_AFTER:
            return first, True
    return first, False


async def respond_cursor(ctx: QueryContext, cursor: Awaitable[Any]) -> web.StreamResponse:
    """The first batch within the deadline; beyond it, the rest streams (bounded per batch by
    the server's maxTimeMS)."""

    async def opened() -> tuple[Any, list[Any], bool]:
        c = await cursor
        return (c, *await first_batch(c))

    opened_cursor, first, more = await ctx.bounded(opened())
    if more:
        return await stream_list(ctx.request, MESSAGE, first, opened_cursor)
    return success(MESSAGE, first)


def paging_stages(options: dict[str, Any]) -> list[dict[str, Any]]:
    """sort / skip / limit cursor options as aggregation stages."""
    stages: list[dict[str, Any]] = []
    if "sort" in options:
        stages.append({"$sort": dict(options["sort"])})
    if "skip" in options:
        stages.append({"$skip": options["skip"]})
    if options.get("limit"):
        stages.append({"$limit": options["limit"]})
    return stages


async def find_docs(
    ctx: QueryContext,
    catalog: str,
    flt: dict[str, Any],
    projection: dict[str, Any] | None,
    one: bool = False,
) -> Any:
    """A cursor over `catalog` seeing only what the user may see: the restriction first, then
    `flt`, paging and `projection`."""
    options = ctx.cursor_options()
    if one:
        options["limit"] = 1
    coll = ctx.db[catalog]
    if ctx.rights.needs_pipeline(catalog):
        pipeline = ctx.rights.pipeline(catalog, flt) + paging_stages(options)
        if projection:
            pipeline.append({"$project": projection})
        agg_options = ctx.aggregate_options()
        if "hint" in options:
            agg_options["hint"] = options["hint"]
        return await coll.aggregate(pipeline, **agg_options)
    return coll.find(ctx.rights.find_filter(catalog, flt), projection, **options)


async def find_list(
    ctx: QueryContext, catalog: str, flt: dict[str, Any], projection: dict[str, Any] | None
) -> list[Any]:
    async def run() -> list[Any]:
        return list(await (await find_docs(ctx, catalog, flt, projection)).to_list())

    return await ctx.bounded(run())


async def permitted_count(ctx: QueryContext, catalog: str, flt: dict[str, Any]) -> int:
    """Documents of `catalog` matching `flt` among those the user may see (skip/limit apply)."""
    coll = ctx.db[catalog]
    paging = {k: v for k, v in ctx.options.paging().items()}
    if ctx.rights.needs_pipeline(catalog):
        stages = ctx.rights.pipeline(catalog, flt) + paging_stages(paging)
        stages.append({"$group": {"_id": None, "n": {"$sum": 1}}})

        async def run() -> list[Any]:
            return list(await (await coll.aggregate(stages, **ctx.aggregate_options())).to_list())

        counted = await ctx.bounded(run())
        return int(counted[0]["n"]) if counted else 0
    options = {"maxTimeMS": ctx.max_time_ms, "comment": ctx.comment, **paging}
    return await ctx.bounded(coll.count_documents(ctx.rights.find_filter(catalog, flt), **options))


# ------------------------------------------------------------------ query types


async def q_find(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.get("catalog"))
    flt, projection = get_filter(query), get_projection(query)
    return await respond_cursor(ctx, find_docs(ctx, catalog, flt, projection))


async def q_find_one(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.get("catalog"))
    flt, projection = get_filter(query), get_projection(query)

    async def run() -> list[Any]:
        return list(await (await find_docs(ctx, catalog, flt, projection, one=True)).to_list())

    docs = await ctx.bounded(run())
    return success(MESSAGE, docs[0] if docs else None)


async def q_count_documents(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.get("catalog"))
    return success(MESSAGE, await permitted_count(ctx, catalog, get_filter(query)))


async def q_estimated_document_count(
    ctx: QueryContext, query: dict[str, Any]
) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.get("catalog"))
    clause = ctx.rights.document_clause(catalog)
    coll = ctx.db[catalog]
    if clause is not None:
        count = await ctx.bounded(coll.count_documents(clause, maxTimeMS=ctx.max_time_ms))
    else:
        count = await ctx.bounded(coll.estimated_document_count(maxTimeMS=ctx.max_time_ms))
    return success(MESSAGE, count)


async def q_aggregate(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.get("catalog"))
    pipeline = ctx.rights.restriction(catalog) + get_pipeline(ctx, query)
    cursor = ctx.db[catalog].aggregate(
        pipeline, allowDiskUse=ctx.options.allow_disk_use, **ctx.aggregate_options()
    )
    return await respond_cursor(ctx, cursor)


# statistics that say nothing about restricted content (sizes would reveal hidden documents)
CONTENT_FREE_STATS = ("ns", "db", "collections", "views", "nindexes", "indexes", "capped", "ok")


async def catalog_info(ctx: QueryContext, catalog: str) -> dict[str, Any]:
    stats: dict[str, Any] = await ctx.bounded(ctx.db.command("collStats", catalog))
    if not ctx.rights.restricted(catalog):
        return stats
    shown = {k: v for k, v in stats.items() if k in CONTENT_FREE_STATS}
    shown["count"] = await permitted_count(ctx, catalog, {})
    return shown


async def db_info(ctx: QueryContext) -> dict[str, Any]:
    stats: dict[str, Any] = await ctx.bounded(ctx.db.command("dbStats"))
    restricted = [
        name for name in (await ctx.db.list_collection_names()) if ctx.rights.restricted(name)
    ]
    if not restricted:
        return stats
    shown = {k: v for k, v in stats.items() if k in CONTENT_FREE_STATS}
    hidden = 0
    for name in restricted:
        total = await ctx.bounded(ctx.db[name].count_documents({}, maxTimeMS=ctx.max_time_ms))
        hidden += total - await permitted_count(ctx, name, {})
    shown["objects"] = int(stats.get("objects", 0)) - hidden
    return shown


async def q_info(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    command = query.get("command")
    if not isinstance(command, str):
        command = None
    if command == "catalog_names":
        hidden = set() if ctx.rights.admin else ctx.rights.protected
        names = [
            n
            for n in await ctx.bounded(ctx.db.list_collection_names())
            if n not in hidden and not n.startswith("system.")
        ]
        return success(MESSAGE, sorted(names, reverse=True))
    if command == "db_info":
        return success(MESSAGE, await db_info(ctx))
    if command in ("catalog_info", "index_info"):
        catalog = ctx.rights.check_catalog(query.get("catalog"))
        if command == "index_info":
            return success(MESSAGE, await ctx.bounded(ctx.db[catalog].index_information()))
        return success(MESSAGE, await catalog_info(ctx, catalog))
    raise BadRequest(
        "query.command must be one of catalog_names, catalog_info, index_info, db_info"
    )


def parse_radec(value: Any) -> dict[str, tuple[float, float]]:
    """Named positions from `{name: [ra, dec]}`, `[[ra, dec], ...]` or a string of either / "ra dec"."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{(":
            try:
                value = json.loads(text.replace("(", "[").replace(")", "]"))
            except (json.JSONDecodeError, RecursionError) as exc:
                raise BadRequest(f"radec: cannot parse {text!r}: {exc}") from None
        else:
            parts = text.replace(",", " ").split()
            if len(parts) != 2:
                raise BadRequest(f"radec: expected 'ra dec', got {text!r}")
            value = {text.replace(".", "_"): parts}
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


def radius_in_rad(value: Any, unit: Any, field: str) -> float:
    if not isinstance(unit, str) or unit not in RADIUS_TO_RAD:
        raise BadRequest(f"{field} unit must be one of {sorted(RADIUS_TO_RAD)}, got {unit!r}")
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise BadRequest(f"{field} must be a finite non-negative number")
    return float(value) * RADIUS_TO_RAD[unit]


def get_catalogs(ctx: QueryContext, query: dict[str, Any]) -> dict[str, dict[str, Any]]:
    catalogs = parse_json_arg(query.get("catalogs"), "query.catalogs")
    if not isinstance(catalogs, dict) or not catalogs:
        raise BadRequest("query.catalogs must be an object {catalog: {filter, projection}}")
    out = {}
    for name, spec in catalogs.items():
        ctx.rights.check_catalog(name, f"query.catalogs.{name}")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise BadRequest(f"query.catalogs.{name} must be an object")
        out[name] = {
            "filter": get_filter(spec, required=False),
            "projection": get_projection(spec, f"query.catalogs.{name}.projection"),
        }
    return out


PositionalRun = Callable[[str, dict[str, Any], float, float], Awaitable[list[Any]]]


async def gather_positional(
    catalogs: dict[str, dict[str, Any]],
    objects: dict[str, tuple[float, float]],
    run: PositionalRun,
) -> dict[str, dict[str, list[Any]]]:
    """Run `run(catalog, spec, ra, dec)` for every catalog x object concurrently (bounded)."""
    semaphore = asyncio.Semaphore(CONE_CONCURRENCY)

    async def one(catalog: str, spec: dict[str, Any], ra: float, dec: float) -> list[Any]:
        async with semaphore:
            return await run(catalog, spec, ra, dec)

    keys = [(c, n) for c in catalogs for n in objects]
    results = await asyncio.gather(*(one(c, catalogs[c], *objects[n]) for c, n in keys))
    out: dict[str, dict[str, list[Any]]] = {c: {} for c in catalogs}
    for (catalog, name), docs in zip(keys, results, strict=True):
        out[catalog][name] = docs
    return out


async def q_cone_search(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    coords = parse_json_arg(query.get("object_coordinates"), "query.object_coordinates")
    if not isinstance(coords, dict):
        raise BadRequest("query.object_coordinates must be an object")
    radius = radius_in_rad(
        coords.get("cone_search_radius"),
        coords.get("cone_search_unit", "arcsec"),
        "query.object_coordinates.cone_search_radius",
    )
    objects = parse_radec(coords.get("radec"))
    catalogs = get_catalogs(ctx, query)
    filter_first = ctx.options.filter_first

    async def run(catalog: str, spec: dict[str, Any], ra: float, dec: float) -> list[Any]:
        cone = cones.cone_query(ra, dec, radius, await cones.has_cells(ctx.db[catalog]))
        user = {k: v for k, v in spec["filter"].items() if k != cones.GEO_FIELD}
        flt = cones.and_filters(user, cone) if filter_first else cones.and_filters(cone, user)
        return await find_list(ctx, catalog, flt, spec["projection"])

    if ctx.options.per_object:  # skip/limit/sort/hint apply to each object's query, as upstream
        return success(MESSAGE, await gather_positional(catalogs, objects, run))
    return success(MESSAGE, await batched_cones(ctx, catalogs, objects, radius, run))


async def batched_cones(
    ctx: QueryContext,
    catalogs: dict[str, dict[str, Any]],
    objects: dict[str, tuple[float, float]],
    radius: float,
    run: PositionalRun,
) -> dict[str, dict[str, list[Any]]]:
    """One `$or` query per catalog per chunk of objects, documents assigned back by distance
    (same results as one query per object, far fewer round trips)."""
    names = list(objects)
    positions = [objects[n] for n in names]
    semaphore = asyncio.Semaphore(CONE_CONCURRENCY)

    async def one_catalog(catalog: str, spec: dict[str, Any]) -> dict[str, list[Any]]:
        plan = cones.projection_with_position(spec["projection"])
        if plan is None:  # the projection hides positions: query per object
            docs = await asyncio.gather(*(run(catalog, spec, *objects[n]) for n in names))
            return dict(zip(names, docs, strict=True))
        projection, strip = plan

        async def find(query: dict[str, Any]) -> list[Any]:
            async with semaphore:
                return await find_list(ctx, catalog, query, projection)

        cells = await cones.has_cells(ctx.db[catalog])
        matches = await cones.search(find, positions, radius, spec["filter"], cells)
        return {
            name: [cones.strip_position(d) if strip else d for d, _ in found]
            for name, found in zip(names, matches, strict=True)
        }

    results = await asyncio.gather(*(one_catalog(c, spec) for c, spec in catalogs.items()))
    return dict(zip(catalogs, results, strict=True))


async def q_near(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    units = query.get("distance_units", "rad")
    min_rad = radius_in_rad(query.get("min_distance", 0), units, "query.min_distance")
    if "max_distance" in query:
        max_rad = radius_in_rad(query["max_distance"], units, "query.max_distance")
    else:
        max_rad = RADIUS_TO_RAD["arcmin"]
    if max_rad < min_rad:
        raise BadRequest("query.max_distance must not be smaller than query.min_distance")
    objects = parse_radec(query.get("radec"))
    catalogs = get_catalogs(ctx, query)
    options = ctx.cursor_options()

    async def run(catalog: str, spec: dict[str, Any], ra: float, dec: float) -> list[Any]:
        # $geoNear must come first: where the restriction rewrites documents, it and the
        # user's filter follow it (the user's filter never sees hidden points)
        rewritten = ctx.rights.needs_pipeline(catalog)
        geo_query = {} if rewritten else ctx.rights.find_filter(catalog, spec["filter"])
        pipeline: list[dict[str, Any]] = [
            {
                "$geoNear": {
                    "near": {"type": "Point", "coordinates": [ra - 180.0, dec]},
                    "key": "coordinates.radec_geojson",
                    "distanceField": "__near_distance",
                    "spherical": True,
                    "minDistance": min_rad * EARTH_RADIUS_M,
                    "maxDistance": max_rad * EARTH_RADIUS_M,
                    "query": geo_query,
                }
            }
        ]
        if rewritten:
            pipeline += ctx.rights.pipeline(catalog, spec["filter"])
        pipeline += paging_stages(options)
        pipeline.append({"$unset": "__near_distance"})
        if spec["projection"]:
            pipeline.append({"$project": spec["projection"]})

        async def fetch() -> list[Any]:
            cursor = await ctx.db[catalog].aggregate(pipeline, **ctx.aggregate_options())
            return list(await cursor.to_list())

        return await ctx.bounded(fetch())

    return success(MESSAGE, await gather_positional(catalogs, objects, run))


def plain(value: Any, field: str) -> Any:
    """An identifier given as a plain value (string or number), never an operator object."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"{field} must be a string or a number")
    return value


def skymap_selector(spec: Any) -> tuple[dict[str, Any], str]:
    """The skymaps query and the contour key for `query.skymap` (validated, no database)."""
    if not isinstance(spec, dict) or not spec.get("localization_name"):
        raise BadRequest("query.skymap.localization_name is required")
    alternatives: list[dict[str, Any]] = []
    if spec.get("dateobs"):
        from api.skymap import parse_dateobs

        alternatives.append({"dateobs": parse_dateobs(spec["dateobs"])})
    trigger = spec.get("trigger_id", spec.get("triggerid"))
    if trigger is not None:
        alternatives.append({"triggerid": plain(trigger, "query.skymap.trigger_id")})
    if spec.get("aliases"):
        aliases = spec["aliases"] if isinstance(spec["aliases"], list) else [spec["aliases"]]
        aliases = [plain(a, "query.skymap.aliases") for a in aliases]
        alternatives.append({"aliases": {"$in": aliases}})
    if not alternatives:
        raise BadRequest("query.skymap needs dateobs, trigger_id or aliases")
    contour = spec.get("contour", 90)
    if isinstance(contour, bool) or not isinstance(contour, int) or not 0 < contour <= 100:
        raise BadRequest("query.skymap.contour must be an integer percentage")
    name = plain(spec["localization_name"], "query.skymap.localization_name")
    return {"localization_name": name, "$or": alternatives}, f"contour{contour}"


async def q_skymap(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    selector, contour = skymap_selector(query.get("skymap"))
    catalog = ctx.rights.check_catalog(query.get("catalog"))
    user_filter, projection = get_filter(query, required=False), get_projection(query)
    skymaps = ctx.db[ctx.cfg.database.collections["skymaps"]]
    doc = await ctx.bounded(skymaps.find_one(selector, {f"contours.{contour}": 1}))
    if doc is None:
        raise NotFound("skymap not found")
    geometry = doc.get("contours", {}).get(contour)
    if geometry is None:
        raise BadRequest(f"ValueError: Contour level {contour[7:]} not found in skymap")
    geo = {"type": geometry["type"], "coordinates": geometry["coordinates"]}
    flt = {"$and": [user_filter, {"coordinates.radec_geojson": {"$geoWithin": {"$geometry": geo}}}]}
    return await respond_cursor(ctx, find_docs(ctx, catalog, flt, projection))


async def q_drop(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.get("catalog"))
    if not ctx.rights.admin:
        raise Forbidden("Forbidden: only admins may drop collections")
    if catalog in ctx.rights.protected:
        raise Forbidden(f"Forbidden: {catalog} is a protected collection")
    await ctx.db[catalog].drop()
    return success("Successfully dropped collection")


QUERY_TYPES: dict[str, Callable[[QueryContext, dict[str, Any]], Awaitable[web.StreamResponse]]] = {
    "find": q_find,
    "find_one": q_find_one,
    "count_documents": q_count_documents,
    "estimated_document_count": q_estimated_document_count,
    "aggregate": q_aggregate,
    "info": q_info,
    "cone_search": q_cone_search,
    "near": q_near,
    "skymap": q_skymap,
    "drop": q_drop,
}


class QuerySlots:
    """At most `limit` queries per user at a time (per worker): one user's heavy queries cannot
    occupy the database for everybody."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    def semaphore(self, username: str) -> asyncio.Semaphore:
        return self._semaphores.setdefault(username, asyncio.Semaphore(self.limit))

    @asynccontextmanager
    async def slot(self, username: str, wait_s: float) -> AsyncIterator[None]:
        semaphore = self.semaphore(username)
        try:
            async with asyncio.timeout(wait_s):
                await semaphore.acquire()
        except TimeoutError:
            raise TooManyRequests(
                f"too many concurrent queries for user {username} (at most {self.limit}); "
                "retry when one has finished"
            ) from None
        try:
            yield
        finally:
            semaphore.release()


QUERY_SLOTS = web.AppKey("query_slots", QuerySlots)


async def queries_post(request: web.Request) -> web.StreamResponse:
    """POST /api/queries: run a query (see the OpenAPI docs for every query type)."""
    body = await read_body(request)
    query_type = body.get("query_type")
    if not isinstance(query_type, str) or query_type not in QUERY_TYPES:
        raise BadRequest(f"query_type must be one of {sorted(QUERY_TYPES)}, got {query_type!r}")
    query = parse_json_arg(body.get("query", {}), "query")
    kwargs = parse_json_arg(body.get("kwargs") or {}, "kwargs")
    if not isinstance(query, dict):
        raise BadRequest("query must be an object")
    if not isinstance(kwargs, dict):
        raise BadRequest("kwargs must be an object")
    cfg: Config = request.app["config"]
    rights = data_rights(request)
    ctx = QueryContext(request, cfg, request.app["db"], rights, parse_options(kwargs, cfg))
    wait_s = ctx.max_time_ms / 1000 + DEADLINE_GRACE_S
    async with request.app[QUERY_SLOTS].slot(rights.user.username, wait_s):
        return await QUERY_TYPES[query_type](ctx, query)
