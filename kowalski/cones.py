"""Many cone searches as few queries: an `$or` of `$geoWithin/$centerSphere` cones per chunk of
positions, then each returned document assigned to the positions it lies within (great-circle
distance). Used by the ingester's cross-match and the API's cone_search."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from kowalski.coords import cone_clause, great_circle_distance

GEO_FIELD = "coordinates.radec_geojson"
POSITIONS_PER_QUERY = 64
TOLERANCE = 1 + 1e-9
Doc = dict[str, Any]


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
    positions: Sequence[tuple[float, float]],
) -> list[tuple[int, Sequence[tuple[float, float]]]]:
    return [
        (start, positions[start : start + POSITIONS_PER_QUERY])
        for start in range(0, len(positions), POSITIONS_PER_QUERY)
    ]


def any_cone(positions: Sequence[tuple[float, float]], radius_rad: float) -> dict[str, Any]:
    cones = [cone_clause(ra, dec, radius_rad) for ra, dec in positions]
    return {"$or": cones} if len(cones) > 1 else cones[0]


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


async def search(
    find: Callable[[dict[str, Any]], Awaitable[list[Doc]]],
    positions: Sequence[tuple[float, float]],
    radius_rad: float,
    extra_filter: dict[str, Any] | None = None,
) -> list[list[tuple[Doc, float]]]:
    """Matches (document, separation in degrees) for each position: one `find(query)` per chunk
    of positions; `find` must return documents with their position (see
    projection_with_position)."""
    out: list[list[tuple[Doc, float]]] = []
    for _, chunk in chunks(positions):
        query = any_cone(chunk, radius_rad)
        if extra_filter:
            query = {"$and": [query, extra_filter]}
        out.extend(assign(await find(query), chunk, radius_rad))
    return out
