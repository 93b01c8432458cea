"""POST /api/queries: find, find_one, count_documents, estimated_document_count, aggregate, info,
cone_search, near, skymap, drop, with upstream request/response shapes.

Better than upstream: per-user ZTF programid permissions on alerts and their history, applied
before the user's filter and stages in every query type (`api/policy.py`); JavaScript, write and
administration operators refused at any depth, and regular expressions that may backtrack
catastrophically (`api/safety.py`), non-admin queries with a regular expression running at most
`misc.regex_max_time_ms`;
all input validated before the first database call; every database call bounded by a wall-clock
deadline of `max_time_ms` (plus a small grace) on the API side, whatever the server does with
`maxTimeMS`; at most `misc.max_concurrent_queries` queries per user at a time per worker;
`drop` admin-only; `find_one` honours `projection`; `count_documents` honours skip/limit;
cone/near searches run concurrently; large results stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pymongo.asynchronous.database import AsyncDatabase

from api.bodies import read_body
from api.models import (
    QUERY_TYPE_NAMES,
    AggregateQuery,
    CatalogSpec,
    ConeSearchQuery,
    CountQuery,
    DropQuery,
    EstimatedCountQuery,
    FindQuery,
    InfoQuery,
    Model,
    NearQuery,
    QueryOptions,
    QueryRequest,
    SkymapQuery,
    parse,
    query_options,
)
from api.policy import DataRights, data_rights
from api.responses import BadRequest, Forbidden, NotFound, TooManyRequests, stream_list, success
from api.safety import regex_patterns
from api.skymap import CELLS
from api.state import CONFIG, DB
from kowalski import cones, metrics
from kowalski.config import Config
from kowalski.skycells import CELL_FIELD, ranges_clause

MESSAGE = "Successfully executed query"
STREAM_AFTER = 500  # documents: larger results are streamed
CONE_CONCURRENCY = 16
EARTH_RADIUS_M = 6378100.0  # MongoDB's sphere for GeoJSON distances
DEADLINE_GRACE_S = 0.5  # the server's own maxTimeMS usually answers first
T = TypeVar("T")


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
                metrics.API_QUERIES_REFUSED.labels("deadline").inc()
                raise BadRequest(f"query exceeded max_time_ms ({self.max_time_ms} ms)") from None
            raise


def checked_pipeline(ctx: QueryContext, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A validated pipeline whose joins only reach what the user may read."""
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


async def q_find(ctx: QueryContext, query: FindQuery) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.catalog)
    return await respond_cursor(ctx, find_docs(ctx, catalog, query.filter, query.projection))


async def q_find_one(ctx: QueryContext, query: FindQuery) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.catalog)

    async def run() -> list[Any]:
        cursor = await find_docs(ctx, catalog, query.filter, query.projection, one=True)
        return list(await cursor.to_list())

    docs = await ctx.bounded(run())
    return success(MESSAGE, docs[0] if docs else None)


async def q_count_documents(ctx: QueryContext, query: CountQuery) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.catalog)
    return success(MESSAGE, await permitted_count(ctx, catalog, query.filter))


async def q_estimated_document_count(
    ctx: QueryContext, query: EstimatedCountQuery
) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.catalog)
    clause = ctx.rights.document_clause(catalog)
    coll = ctx.db[catalog]
    if clause is not None:
        count = await ctx.bounded(coll.count_documents(clause, maxTimeMS=ctx.max_time_ms))
    else:
        count = await ctx.bounded(coll.estimated_document_count(maxTimeMS=ctx.max_time_ms))
    return success(MESSAGE, count)


async def q_aggregate(ctx: QueryContext, query: AggregateQuery) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.catalog)
    pipeline = ctx.rights.restriction(catalog) + checked_pipeline(ctx, query.pipeline)
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


async def q_info(ctx: QueryContext, query: InfoQuery) -> web.StreamResponse:
    command = query.command
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
    catalog = ctx.rights.check_catalog(query.catalog)
    if command == "index_info":
        return success(MESSAGE, await ctx.bounded(ctx.db[catalog].index_information()))
    return success(MESSAGE, await catalog_info(ctx, catalog))


PositionalRun = Callable[[str, CatalogSpec, float, float], Awaitable[list[Any]]]


async def gather_positional(
    catalogs: dict[str, CatalogSpec],
    objects: dict[str, tuple[float, float]],
    run: PositionalRun,
) -> dict[str, dict[str, list[Any]]]:
    """Run `run(catalog, spec, ra, dec)` for every catalog x object concurrently (bounded)."""
    semaphore = asyncio.Semaphore(CONE_CONCURRENCY)

    async def one(catalog: str, spec: CatalogSpec, ra: float, dec: float) -> list[Any]:
        async with semaphore:
            return await run(catalog, spec, ra, dec)

    keys = [(c, n) for c in catalogs for n in objects]
    results = await asyncio.gather(*(one(c, catalogs[c], *objects[n]) for c, n in keys))
    out: dict[str, dict[str, list[Any]]] = {c: {} for c in catalogs}
    for (catalog, name), docs in zip(keys, results, strict=True):
        out[catalog][name] = docs
    return out


def readable_catalogs(ctx: QueryContext, catalogs: dict[str, CatalogSpec]) -> None:
    for name in catalogs:
        ctx.rights.check_catalog(name, f"query.catalogs.{name}")


async def q_cone_search(ctx: QueryContext, query: ConeSearchQuery) -> web.StreamResponse:
    coords, catalogs = query.object_coordinates, query.catalogs
    radius, objects = coords.radius_rad, coords.radec
    readable_catalogs(ctx, catalogs)
    filter_first = ctx.options.filter_first

    async def run(catalog: str, spec: CatalogSpec, ra: float, dec: float) -> list[Any]:
        cone = cones.cone_query(ra, dec, radius, await cones.has_cells(ctx.db[catalog]))
        user = {k: v for k, v in spec.filter.items() if k != cones.GEO_FIELD}
        flt = cones.and_filters(user, cone) if filter_first else cones.and_filters(cone, user)
        return await find_list(ctx, catalog, flt, spec.projection)

    if ctx.options.per_object:  # skip/limit/sort/hint apply to each object's query, as upstream
        return success(MESSAGE, await gather_positional(catalogs, objects, run))
    return success(MESSAGE, await batched_cones(ctx, catalogs, objects, radius, run))


async def batched_cones(
    ctx: QueryContext,
    catalogs: dict[str, CatalogSpec],
    objects: dict[str, tuple[float, float]],
    radius: float,
    run: PositionalRun,
) -> dict[str, dict[str, list[Any]]]:
    """One `$or` query per catalog per chunk of objects, documents assigned back by distance
    (same results as one query per object, far fewer round trips)."""
    names = list(objects)
    positions = [objects[n] for n in names]
    semaphore = asyncio.Semaphore(CONE_CONCURRENCY)

    async def one_catalog(catalog: str, spec: CatalogSpec) -> dict[str, list[Any]]:
        plan = cones.projection_with_position(spec.projection)
        if plan is None:  # the projection hides positions: query per object
            docs = await asyncio.gather(*(run(catalog, spec, *objects[n]) for n in names))
            return dict(zip(names, docs, strict=True))
        projection, strip = plan

        # the order is the user's (query options), as in the per-object queries
        async def find(query: dict[str, Any], _sort: cones.Sort | None) -> list[Any]:
            async with semaphore:
                return await find_list(ctx, catalog, query, projection)

        cells = await cones.has_cells(ctx.db[catalog])
        matches = await cones.search(find, positions, radius, spec.filter, cells)
        return {
            name: [cones.strip_position(d) if strip else d for d, _ in found]
            for name, found in zip(names, matches, strict=True)
        }

    results = await asyncio.gather(*(one_catalog(c, spec) for c, spec in catalogs.items()))
    return dict(zip(catalogs, results, strict=True))


async def q_near(ctx: QueryContext, query: NearQuery) -> web.StreamResponse:
    min_rad, max_rad, objects, catalogs = query.min_rad, query.max_rad, query.radec, query.catalogs
    readable_catalogs(ctx, catalogs)
    options = ctx.cursor_options()

    async def run(catalog: str, spec: CatalogSpec, ra: float, dec: float) -> list[Any]:
        # $geoNear must come first: where the restriction rewrites documents, it and the
        # user's filter follow it (the user's filter never sees hidden points)
        rewritten = ctx.rights.needs_pipeline(catalog)
        geo_query = {} if rewritten else ctx.rights.find_filter(catalog, spec.filter)
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
            pipeline += ctx.rights.pipeline(catalog, spec.filter)
        pipeline += paging_stages(options)
        pipeline.append({"$unset": "__near_distance"})
        if spec.projection:
            pipeline.append({"$project": spec.projection})

        async def fetch() -> list[Any]:
            cursor = await ctx.db[catalog].aggregate(pipeline, **ctx.aggregate_options())
            return list(await cursor.to_list())

        return await ctx.bounded(fetch())

    return success(MESSAGE, await gather_positional(catalogs, objects, run))


def cell_ranges_clause(ranges: list[list[int]]) -> dict[str, Any]:
    """A multi-order credible region (a union of HEALPix cells) selected exactly by the alerts'
    order-29 sky cells; an empty region matches nothing."""
    if not ranges:
        return {CELL_FIELD: {"$in": []}}
    return ranges_clause([(low, high) for low, high in ranges])


async def q_skymap(ctx: QueryContext, query: SkymapQuery) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.catalog)
    contour = query.skymap.contour_key
    skymaps = ctx.db[ctx.cfg.database.collection("skymaps")]
    projection = {f"contours.{contour}": 1, f"{CELLS}.{contour}": 1}
    doc = await ctx.bounded(skymaps.find_one(query.skymap.selector(), projection))
    if doc is None:
        raise NotFound("skymap not found")
    geometry = doc.get("contours", {}).get(contour)
    if geometry is None:
        raise BadRequest(f"ValueError: Contour level {contour[7:]} not found in skymap")
    ranges = doc.get(CELLS, {}).get(contour)
    if ranges is not None and await cones.has_cells(ctx.db[catalog]):
        region = cell_ranges_clause(ranges)
    else:
        geo = {"type": geometry["type"], "coordinates": geometry["coordinates"]}
        region = {"coordinates.radec_geojson": {"$geoWithin": {"$geometry": geo}}}
    flt = {"$and": [query.filter, region]}
    return await respond_cursor(ctx, find_docs(ctx, catalog, flt, query.projection))


async def q_drop(ctx: QueryContext, query: DropQuery) -> web.StreamResponse:
    catalog = ctx.rights.check_catalog(query.catalog)
    if not ctx.rights.admin:
        raise Forbidden("Forbidden: only admins may drop collections")
    if catalog in ctx.rights.protected:
        raise Forbidden(f"Forbidden: {catalog} is a protected collection")
    await ctx.db[catalog].drop()
    return success("Successfully dropped collection")


@dataclass(frozen=True)
class QueryType:
    """A query type of `POST /api/queries`: the model its `query` is parsed with, its handler."""

    model: type[Model]
    handler: Callable[[QueryContext, Any], Awaitable[web.StreamResponse]]


QUERY_TYPES: dict[str, QueryType] = {
    "find": QueryType(FindQuery, q_find),
    "find_one": QueryType(FindQuery, q_find_one),
    "count_documents": QueryType(CountQuery, q_count_documents),
    "estimated_document_count": QueryType(EstimatedCountQuery, q_estimated_document_count),
    "aggregate": QueryType(AggregateQuery, q_aggregate),
    "info": QueryType(InfoQuery, q_info),
    "cone_search": QueryType(ConeSearchQuery, q_cone_search),
    "near": QueryType(NearQuery, q_near),
    "skymap": QueryType(SkymapQuery, q_skymap),
    "drop": QueryType(DropQuery, q_drop),
}
if tuple(QUERY_TYPES) != QUERY_TYPE_NAMES:  # the request model's vocabulary is this table's
    raise RuntimeError(f"QUERY_TYPE_NAMES {QUERY_TYPE_NAMES} != {tuple(QUERY_TYPES)}")


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
            metrics.API_QUERIES_REFUSED.labels("cap").inc()
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
    cfg: Config = request.app[CONFIG]
    body = parse(QueryRequest, await read_body(request))
    options = query_options(body.kwargs, cfg.misc.max_time_ms)
    kind = QUERY_TYPES[body.query_type]
    query = parse(kind.model, body.query)
    rights = data_rights(request)
    if not rights.user.admin and any(regex_patterns(query.model_dump())):
        limit = min(options.max_time_ms, cfg.misc.regex_max_time_ms)
        options = options.model_copy(update={"max_time_ms": limit})
    ctx = QueryContext(request, cfg, request.app[DB], rights, options)
    wait_s = ctx.max_time_ms / 1000 + DEADLINE_GRACE_S
    with metrics.API_QUERY_SECONDS.labels(body.query_type).time():
        async with request.app[QUERY_SLOTS].slot(rights.user.username, wait_s):
            return await kind.handler(ctx, query)
