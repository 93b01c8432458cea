"""POST /api/queries: find, find_one, count_documents, estimated_document_count, aggregate, info,
cone_search, near, skymap, drop, with upstream request/response shapes.

Better than upstream: per-user ZTF programid permissions on alerts and their history; JavaScript
and write operators refused at any depth; `drop` admin-only; `find_one` honours `projection`;
`count_documents` honours skip/limit; cone/near searches run concurrently; large results stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from api.auth import User, current_user, read_body
from api.responses import BadRequest, Forbidden, NotFound, stream_list, success
from api.safety import check_safe, parse_json_arg, referenced_collections
from kowalski import cones
from kowalski.config import Config
from kowalski.coords import RADIUS_TO_RAD, parse_dec, parse_ra
from kowalski.db import system_collection_names

MESSAGE = "Successfully executed query"
STREAM_AFTER = 500  # documents: larger results are streamed
CONE_CONCURRENCY = 16
EARTH_RADIUS_M = 6378100.0  # MongoDB's sphere for GeoJSON distances


@dataclass
class QueryContext:
    request: web.Request
    cfg: Config
    db: AsyncDatabase[dict[str, Any]]
    user: User
    kwargs: dict[str, Any]

    @property
    def max_time_ms(self) -> int:
        value = self.kwargs.get("max_time_ms", self.cfg.misc.max_time_ms)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
            raise BadRequest("kwargs.max_time_ms must be a positive number of milliseconds")
        return int(value)

    def count_kw(self, name: str) -> int | None:
        value = self.kwargs.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"kwargs.{name} must be a non-negative integer")
        return value

    @property
    def sort(self) -> list[tuple[str, int]] | None:
        return parse_sort(self.kwargs.get("sort"))

    @property
    def hint(self) -> Any:
        hint = self.kwargs.get("hint")
        if hint is None or isinstance(hint, str):
            return hint
        return parse_sort(hint, field="hint")

    def paging(self) -> dict[str, Any]:
        """skip / limit / hint as given (validated)."""
        options: dict[str, Any] = {}
        for name in ("skip", "limit"):
            if (value := self.count_kw(name)) is not None:
                options[name] = value
        if (hint := self.hint) is not None:
            options["hint"] = hint
        return options

    def cursor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_time_ms": self.max_time_ms, "comment": self.user.username}
        options.update(self.paging())
        if (sort := self.sort) is not None:
            options["sort"] = sort
        return options


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


# ------------------------------------------------------------------ catalogs and permissions


def restricted_kind(cfg: Config, catalog: str) -> str | None:
    """'alerts' / 'aux' for the ZTF collections whose content depends on programid."""
    collections = cfg.database.collections
    if catalog == collections.get("alerts_ztf"):
        return "alerts"
    if catalog == collections.get("alerts_ztf_aux"):
        return "aux"
    return None


def check_catalog(ctx: QueryContext, catalog: Any, field: str = "query.catalog") -> str:
    if not isinstance(catalog, str) or not catalog:
        raise BadRequest(f"{field} must be a collection name")
    if catalog.startswith("system.") or "$" in catalog:
        raise BadRequest(f"{field}: invalid collection name {catalog!r}")
    if catalog in system_collection_names(ctx.cfg) and not ctx.user.admin:
        raise Forbidden(f"Forbidden: {catalog} is a protected collection")
    return catalog


def programid_clause(ctx: QueryContext) -> dict[str, Any]:
    return {"candidate.programid": {"$in": ctx.user.allowed_programids("ZTF")}}


def history_stage(ctx: QueryContext) -> dict[str, Any]:
    """$set stage keeping only permitted items of an aux document's history arrays."""
    allowed = ctx.user.allowed_programids("ZTF")

    def keep(array: str) -> dict[str, Any]:
        return {
            "$cond": [
                {"$isArray": f"${array}"},
                {
                    "$filter": {
                        "input": f"${array}",
                        "as": "item",
                        "cond": {"$in": ["$$item.programid", allowed]},
                    }
                },
                f"${array}",
            ]
        }

    return {"$set": {"prv_candidates": keep("prv_candidates"), "fp_hists": keep("fp_hists")}}


def restrict_filter(ctx: QueryContext, catalog: str, flt: dict[str, Any]) -> dict[str, Any]:
    if restricted_kind(ctx.cfg, catalog) == "alerts" and not ctx.user.sees_everything():
        return {"$and": [flt, programid_clause(ctx)]} if flt else programid_clause(ctx)
    return flt


def restrict_pipeline(ctx: QueryContext, catalog: str, pipeline: list[Any]) -> list[Any]:
    if ctx.user.admin:
        return pipeline
    protected = system_collection_names(ctx.cfg)
    for target in referenced_collections(pipeline):
        if target in protected:
            raise Forbidden(f"Forbidden: {target} is a protected collection")
        if restricted_kind(ctx.cfg, target) and not ctx.user.sees_everything():
            raise Forbidden(
                f"Forbidden: joining {target} needs access to every ZTF programid; "
                f"query {target} directly instead"
            )
    if ctx.user.sees_everything():
        return pipeline
    kind = restricted_kind(ctx.cfg, catalog)
    if kind == "alerts":
        return [{"$match": programid_clause(ctx)}, *pipeline]
    if kind == "aux":
        return [history_stage(ctx), *pipeline]
    return pipeline


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


# ------------------------------------------------------------------ result helpers


async def respond_cursor(ctx: QueryContext, cursor: Any) -> web.StreamResponse:
    first: list[Any] = []
    async for doc in cursor:
        first.append(doc)
        if len(first) > STREAM_AFTER:
            return await stream_list(ctx.request, MESSAGE, first, cursor)
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
    coll: AsyncCollection[dict[str, Any]],
    flt: dict[str, Any],
    projection: dict[str, Any] | None,
    one: bool = False,
) -> Any:
    """A cursor (or list) over `coll` honouring permissions; aux history is filtered server-side."""
    options = ctx.cursor_options()
    if one:
        options["limit"] = 1
    if restricted_kind(ctx.cfg, coll.name) == "aux" and not ctx.user.sees_everything():
        pipeline: list[dict[str, Any]] = [{"$match": flt}, history_stage(ctx), {"$match": flt}]
        pipeline += paging_stages(options)
        if projection:
            pipeline.append({"$project": projection})
        agg_options: dict[str, Any] = {
            "maxTimeMS": options["max_time_ms"],
            "comment": options["comment"],
        }
        if "hint" in options:
            agg_options["hint"] = options["hint"]
        return await coll.aggregate(pipeline, **agg_options)
    return coll.find(restrict_filter(ctx, coll.name, flt), projection, **options)


# ------------------------------------------------------------------ query types


async def q_find(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    coll = ctx.db[check_catalog(ctx, query.get("catalog"))]
    cursor = await find_docs(ctx, coll, get_filter(query), get_projection(query))
    return await respond_cursor(ctx, cursor)


async def q_find_one(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    coll = ctx.db[check_catalog(ctx, query.get("catalog"))]
    cursor = await find_docs(ctx, coll, get_filter(query), get_projection(query), one=True)
    docs = await cursor.to_list()
    return success(MESSAGE, docs[0] if docs else None)


async def q_count_documents(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    catalog = check_catalog(ctx, query.get("catalog"))
    options = {"maxTimeMS": ctx.max_time_ms, "comment": ctx.user.username, **ctx.paging()}
    flt = restrict_filter(ctx, catalog, get_filter(query))
    return success(MESSAGE, await ctx.db[catalog].count_documents(flt, **options))


async def q_estimated_document_count(
    ctx: QueryContext, query: dict[str, Any]
) -> web.StreamResponse:
    catalog = check_catalog(ctx, query.get("catalog"))
    coll = ctx.db[catalog]
    if restricted_kind(ctx.cfg, catalog) == "alerts" and not ctx.user.sees_everything():
        count = await coll.count_documents(programid_clause(ctx), maxTimeMS=ctx.max_time_ms)
    else:
        count = await coll.estimated_document_count(maxTimeMS=ctx.max_time_ms)
    return success(MESSAGE, count)


async def q_aggregate(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    catalog = check_catalog(ctx, query.get("catalog"))
    pipeline = parse_json_arg(query.get("pipeline"), "query.pipeline")
    if not isinstance(pipeline, list) or not pipeline:
        raise BadRequest("query.pipeline must be a non-empty list of stages")
    if not all(isinstance(stage, dict) and len(stage) == 1 for stage in pipeline):
        raise BadRequest("query.pipeline: each stage must be an object with exactly one operator")
    check_safe(pipeline, "query.pipeline")
    if any("$unionWith" in stage for stage in pipeline):
        raise Forbidden("Forbidden: query.pipeline uses $unionWith, which queries may not use")
    allow_disk_use = ctx.kwargs.get("allowDiskUse", True)
    cursor = await ctx.db[catalog].aggregate(
        restrict_pipeline(ctx, catalog, pipeline),
        allowDiskUse=bool(allow_disk_use),
        maxTimeMS=ctx.max_time_ms,
        comment=ctx.user.username,
    )
    return await respond_cursor(ctx, cursor)


async def q_info(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    command = query.get("command")
    if not isinstance(command, str):
        command = None
    if command == "catalog_names":
        hidden = set() if ctx.user.admin else system_collection_names(ctx.cfg)
        names = [
            n
            for n in await ctx.db.list_collection_names()
            if n not in hidden and not n.startswith("system.")
        ]
        return success(MESSAGE, sorted(names, reverse=True))
    if command == "db_info":
        return success(MESSAGE, await ctx.db.command("dbStats"))
    if command in ("catalog_info", "index_info"):
        catalog = check_catalog(ctx, query.get("catalog"))
        if command == "index_info":
            return success(MESSAGE, await ctx.db[catalog].index_information())
        return success(MESSAGE, await ctx.db.command("collStats", catalog))
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
            except json.JSONDecodeError as exc:
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
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadRequest(f"{field} must be a non-negative number")
    return float(value) * RADIUS_TO_RAD[unit]


def get_catalogs(ctx: QueryContext, query: dict[str, Any]) -> dict[str, dict[str, Any]]:
    catalogs = parse_json_arg(query.get("catalogs"), "query.catalogs")
    if not isinstance(catalogs, dict) or not catalogs:
        raise BadRequest("query.catalogs must be an object {catalog: {filter, projection}}")
    out = {}
    for name, spec in catalogs.items():
        check_catalog(ctx, name, f"query.catalogs.{name}")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise BadRequest(f"query.catalogs.{name} must be an object")
        out[name] = {
            "filter": get_filter(spec, required=False),
            "projection": get_projection(spec, f"query.catalogs.{name}.projection"),
        }
    return out


async def gather_positional(
    ctx: QueryContext,
    catalogs: dict[str, dict[str, Any]],
    objects: dict[str, tuple[float, float]],
    run: Callable[[str, dict[str, Any], float, float], Awaitable[list[Any]]],
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
    filter_first = bool(ctx.kwargs.get("filter_first", False))
    per_object = any(ctx.kwargs.get(k) is not None for k in ("skip", "limit", "sort", "hint"))

    async def run(catalog: str, spec: dict[str, Any], ra: float, dec: float) -> list[Any]:
        cone = cones.cone_query(ra, dec, radius, await cones.has_cells(ctx.db[catalog]))
        user = {k: v for k, v in spec["filter"].items() if k != cones.GEO_FIELD}
        flt = cones.and_filters(user, cone) if filter_first else cones.and_filters(cone, user)
        cursor = await find_docs(ctx, ctx.db[catalog], flt, spec["projection"])
        return await cursor.to_list()

    if per_object:  # skip/limit/sort/hint apply to each object's query, as upstream
        return success(MESSAGE, await gather_positional(ctx, catalogs, objects, run))
    return success(MESSAGE, await batched_cones(ctx, catalogs, objects, radius, run))


async def batched_cones(
    ctx: QueryContext,
    catalogs: dict[str, dict[str, Any]],
    objects: dict[str, tuple[float, float]],
    radius: float,
    run: Callable[[str, dict[str, Any], float, float], Awaitable[list[Any]]],
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
                return await (await find_docs(ctx, ctx.db[catalog], query, projection)).to_list()

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
        pipeline: list[dict[str, Any]] = [
            {
                "$geoNear": {
                    "near": {"type": "Point", "coordinates": [ra - 180.0, dec]},
                    "key": "coordinates.radec_geojson",
                    "distanceField": "__near_distance",
                    "spherical": True,
                    "minDistance": min_rad * EARTH_RADIUS_M,
                    "maxDistance": max_rad * EARTH_RADIUS_M,
                    "query": restrict_filter(ctx, catalog, spec["filter"]),
                }
            }
        ]
        if restricted_kind(ctx.cfg, catalog) == "aux" and not ctx.user.sees_everything():
            pipeline.append(history_stage(ctx))
        pipeline += paging_stages(options)
        pipeline.append({"$unset": "__near_distance"})
        if spec["projection"]:
            pipeline.append({"$project": spec["projection"]})
        cursor = await ctx.db[catalog].aggregate(
            pipeline, maxTimeMS=options["max_time_ms"], comment=options["comment"]
        )
        return await cursor.to_list()

    return success(MESSAGE, await gather_positional(ctx, catalogs, objects, run))


async def q_skymap(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    spec = query.get("skymap")
    if not isinstance(spec, dict) or not spec.get("localization_name"):
        raise BadRequest("query.skymap.localization_name is required")
    alternatives: list[dict[str, Any]] = []
    if spec.get("dateobs"):
        from api.skymap import parse_dateobs

        alternatives.append({"dateobs": parse_dateobs(spec["dateobs"])})
    trigger = spec.get("trigger_id", spec.get("triggerid"))
    if trigger is not None:
        alternatives.append({"triggerid": trigger})
    if spec.get("aliases"):
        aliases = spec["aliases"] if isinstance(spec["aliases"], list) else [spec["aliases"]]
        alternatives.append({"aliases": {"$in": aliases}})
    if not alternatives:
        raise BadRequest("query.skymap needs dateobs, trigger_id or aliases")
    contour = spec.get("contour", 90)
    skymaps = ctx.db[ctx.cfg.database.collections["skymaps"]]
    doc = await skymaps.find_one(
        {"localization_name": spec["localization_name"], "$or": alternatives},
        {f"contours.contour{contour}": 1},
    )
    if doc is None:
        raise NotFound("skymap not found")
    geometry = doc.get("contours", {}).get(f"contour{contour}")
    if geometry is None:
        raise BadRequest(f"ValueError: Contour level {contour} not found in skymap")
    geo = {"type": geometry["type"], "coordinates": geometry["coordinates"]}
    coll = ctx.db[check_catalog(ctx, query.get("catalog"))]
    flt = {
        "$and": [
            get_filter(query, required=False),
            {"coordinates.radec_geojson": {"$geoWithin": {"$geometry": geo}}},
        ]
    }
    cursor = await find_docs(ctx, coll, flt, get_projection(query))
    return await respond_cursor(ctx, cursor)


async def q_drop(ctx: QueryContext, query: dict[str, Any]) -> web.StreamResponse:
    catalog = check_catalog(ctx, query.get("catalog"))
    if not ctx.user.admin:
        raise Forbidden("Forbidden: only admins may drop collections")
    if catalog in system_collection_names(ctx.cfg):
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
    ctx = QueryContext(request, cfg, request.app["db"], current_user(request), kwargs)
    return await QUERY_TYPES[query_type](ctx, query)
