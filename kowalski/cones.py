"""Cone searches, the one way. One cone: its sky-cell ranges (a B-tree pre-selection, see
kowalski/skycells.py) AND `$geoWithin/$centerSphere` (the exact test). Many cones: one query per
chunk of positions, the union of their cell ranges, every returned document then assigned to the
positions it lies within by great-circle distance (the exact test; an `$or` of per-cone
`{ranges, $geoWithin}` clauses was 2-3x slower than `$geoWithin` alone on secantusd-rs, the
merged ranges 40x faster). Queries with cells ask for the documents in cell order, the index's
own order: on secantusd-rs an `$or` of many ranges cost ~15x more per returned document in its
default order (measured: 34 -> 9 ms of server CPU per position for 300" cones over the benchmark
night's catalog, same documents); on `mongod` the ranges on one indexed field are one index scan
whose order is that sort, so it costs nothing there. Collections without sky cells get
`$geoWithin` (an `$or` of cones). Used by the ingester's cross-match and the API's cone_search."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from kowalski.coords import cone_clause, great_circle_distance
from kowalski.documents import Doc
from kowalski.skycells import CELL_FIELD, cone_cell_clause, cones_cell_clause, is_cell_index

GEO_FIELD = "coordinates.radec_geojson"
# cones per query. With sky cells, larger chunks save round trips but not server time: 256 cones
# over 20k rows took 0.33 s as 4 queries of 64 and 0.54 s as one query on secantusd-rs
POSITIONS_PER_QUERY = 64
TOLERANCE = 1 + 1e-9
CELL_CHECK_TTL_S = 300.0  # as often as the ingester reloads its filters
Sort = list[tuple[str, int]]
Find = Callable[[Doc, Sort | None], Awaitable[list[Doc]]]
CELL_SORT: Sort = [(CELL_FIELD, 1)]
_cell_checks: dict[tuple[int, str], tuple[float, bool]] = {}


async def _cells_complete(coll: Any) -> bool:
    indexes = await coll.index_information()
    names = [name for name, info in indexes.items() if is_cell_index(info["key"])]
    if not names:
        return False
    # an index created over older documents (an upgraded deployment, a restored dump) is not
    # enough: every located document must carry its cell, or the pre-selection would drop it
    missing = await coll.find_one(
        {CELL_FIELD: {"$exists": False}, GEO_FIELD: {"$exists": True}},
        {"_id": 1},
        hint=names[0],
    )
    return missing is None


async def has_cells(coll: Any) -> bool:
    """Whether cones on `coll` (an async collection) may pre-select by sky cell: a cell index
    exists and no located document lacks its cell. Cached per collection for CELL_CHECK_TTL_S."""
    key = (id(coll.database.client), coll.full_name)
    now = time.monotonic()
    cached = _cell_checks.get(key)
    if cached and now - cached[0] < CELL_CHECK_TTL_S:
        return cached[1]
    answer = await _cells_complete(coll)
    _cell_checks[key] = (now, answer)
    return answer


def forget_cell_checks() -> None:
    """Drop the cached has_cells answers (after adding cells to a collection in place)."""
    _cell_checks.clear()


def cone_query(ra: float, dec: float, radius_rad: float, cells: bool) -> Doc:
    """One cone (degrees, radius in radians): cell ranges AND `$geoWithin`, or the latter alone."""
    geo = cone_clause(ra, dec, radius_rad)
    return {**cone_cell_clause(ra, dec, radius_rad), **geo} if cells else geo


def and_filters(first: Doc, second: Doc | None) -> Doc:
    """Both filters: one document when their keys differ (the form every server plans best),
    `$and` when they share one (e.g. both have an `$or`)."""
    if not second:
        return first
    if first.keys() & second.keys():
        return {"$and": [first, second]}
    return {**first, **second}


def is_inclusive(projection: dict[str, Any] | None) -> bool:
    """MongoDB's rule: an inclusion projection names a field with a true value, or is `_id` alone."""
    if not projection:
        return False
    fields = {k: v for k, v in projection.items() if k != "_id"}
    return any(bool(v) for v in fields.values()) if fields else bool(projection.get("_id"))


def projection_with_position(
    projection: dict[str, Any] | None,
) -> tuple[dict[str, Any] | None, bool] | None:
    """(projection that returns the position, whether to strip it afterwards), or None when the
    projection hides the position (callers then query per position)."""
    if not projection:
        return None, False
    if not is_inclusive(projection):
        hides = any(k in projection for k in ("coordinates", GEO_FIELD))
        return None if hides else (projection, False)
    if any(k in projection for k in ("coordinates", GEO_FIELD)):
        return projection, False
    return {**projection, GEO_FIELD: 1}, True


def strip_position(doc: Doc) -> Doc:
    coords = dict(doc.get("coordinates", {}))
    coords.pop("radec_geojson", None)
    out = dict(doc)
    if coords:
        out["coordinates"] = coords
    else:
        out.pop("coordinates", None)
    return out


def chunks(
    positions: Sequence[tuple[float, float]], size: int = POSITIONS_PER_QUERY
) -> list[tuple[int, Sequence[tuple[float, float]]]]:
    return [(start, positions[start : start + size]) for start in range(0, len(positions), size)]


def any_cone(
    positions: Sequence[tuple[float, float]], radius_rad: float, cells: bool = False
) -> dict[str, Any]:
    """The query of a chunk of cones: see the module's docstring."""
    if len(positions) == 1:
        return cone_query(*positions[0], radius_rad, cells)
    if cells:
        return cones_cell_clause(positions, radius_rad)
    return {"$or": [cone_clause(ra, dec, radius_rad) for ra, dec in positions]}


def assign(
    docs: Sequence[Doc], positions: Sequence[tuple[float, float]], radius_rad: float
) -> list[list[tuple[Doc, float]]]:
    """For each position, the (document, separation in degrees) within the radius."""
    out: list[list[tuple[Doc, float]]] = [[] for _ in positions]
    if not docs:
        return out
    lonlat = np.array([d["coordinates"]["radec_geojson"]["coordinates"] for d in docs], dtype=float)
    ras, decs = lonlat[:, 0] + 180.0, lonlat[:, 1]
    radius_deg = math.degrees(radius_rad) * TOLERANCE
    for i, (ra, dec) in enumerate(positions):
        sep = great_circle_distance(ra, dec, ras, decs)
        out[i] = [(docs[int(j)], float(sep[j])) for j in np.flatnonzero(sep <= radius_deg)]
    return out


def order(cells: bool) -> Sort | None:
    """The order to ask a cone query's documents in: the cell index's when it pre-selects."""
    return CELL_SORT if cells else None


async def search(
    find: Find,
    positions: Sequence[tuple[float, float]],
    radius_rad: float,
    extra_filter: dict[str, Any] | None = None,
    cells: bool = False,
) -> list[list[tuple[Doc, float]]]:
    """Matches (document, separation in degrees) for each position: one `find(query, sort)` per
    chunk of positions; `find` must return documents with their position (see
    projection_with_position). `cells`: the collection has sky cells (see has_cells)."""
    out: list[list[tuple[Doc, float]]] = []
    for _, chunk in chunks(positions):
        query = and_filters(any_cone(chunk, radius_rad, cells), extra_filter)
        out.extend(assign(await find(query, order(cells)), chunk, radius_rad))
    return out
