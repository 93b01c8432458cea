"""Stage: cross-match a batch of positions against the configured catalogs.

One query per catalog per batch (an `$or` of `$geoWithin/$centerSphere` cones on
`coordinates.radec_geojson`), matches assigned to each position by great-circle distance.
Distance-based catalogs (CLU, NED) use a coarse cone, then a per-galaxy radius.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from kowalski.config import XMatchCatalog
from kowalski.coords import RADIUS_TO_RAD, cone_clause, great_circle_distance

log = logging.getLogger("kowalski.ingester.xmatch")

SPEED_OF_LIGHT_KMS = 299792.458
HUBBLE_CONSTANT = 67.66  # km/s/Mpc
GEO_FIELD = "coordinates.radec_geojson"
POSITIONS_PER_QUERY = 64


def _projection(spec: XMatchCatalog) -> tuple[dict[str, Any] | None, bool]:
    """The projection to query with, and whether the position must be stripped afterwards."""
    projection = dict(spec.projection)
    inclusive = any(v for k, v in projection.items() if k != "_id")
    if not projection or not inclusive:
        return projection or None, False
    needs_strip = not any(k in projection for k in (GEO_FIELD, "coordinates"))
    projection[GEO_FIELD] = 1
    return projection, needs_strip


def _position(doc: dict[str, Any]) -> tuple[float, float]:
    lon, lat = doc["coordinates"]["radec_geojson"]["coordinates"]
    return lon + 180.0, lat


def _strip_position(doc: dict[str, Any]) -> dict[str, Any]:
    coords = dict(doc.get("coordinates", {}))
    coords.pop("radec_geojson", None)
    out = dict(doc)
    if coords:
        out["coordinates"] = coords
    else:
        out.pop("coordinates", None)
    return out


def galaxy_radius_arcsec(spec: XMatchCatalog, doc: dict[str, Any]) -> tuple[float, float | None]:
    """(match radius in arcsec, distance in Mpc or None) for a distance-based catalog row."""
    value = doc.get(spec.distance_value or "")
    low = spec.cm_low_distance or 0.0
    at = spec.cm_at_distance or 0.0
    if not isinstance(value, int | float) or value is None or math.isnan(value) or value <= 0:
        return low, None
    if spec.distance_method == "redshift":
        mpc = value * SPEED_OF_LIGHT_KMS / HUBBLE_CONSTANT
        radius = low if value < 0.01 else at * (0.05 / value)
        return radius, mpc
    radius = low if value < 40 else math.degrees(math.atan(at / (value * 1000.0))) * 3600.0
    return radius, float(value)


async def match_catalog(
    db: AsyncDatabase[dict[str, Any]],
    catalog: str,
    spec: XMatchCatalog,
    positions: Sequence[tuple[float, float]],
) -> list[list[dict[str, Any]]]:
    """Matches of `catalog` for each position (same order)."""
    radius_rad = spec.cone_search_radius * RADIUS_TO_RAD[spec.cone_search_unit]
    radius_deg = math.degrees(radius_rad)
    projection, strip = _projection(spec)
    results: list[list[dict[str, Any]]] = [[] for _ in positions]
    for start in range(0, len(positions), POSITIONS_PER_QUERY):
        chunk = positions[start : start + POSITIONS_PER_QUERY]
        cones = [cone_clause(ra, dec, radius_rad) for ra, dec in chunk]
        query: dict[str, Any] = {"$or": cones} if len(cones) > 1 else cones[0]
        if spec.filter:
            query = {"$and": [query, spec.filter]}
        docs = await db[catalog].find(query, projection).to_list()
        if not docs:
            continue
        cat_pos = np.array([_position(d) for d in docs])
        for offset, (ra, dec) in enumerate(chunk):
            sep_deg = great_circle_distance(ra, dec, cat_pos[:, 0], cat_pos[:, 1])
            for j in np.flatnonzero(sep_deg <= radius_deg * (1 + 1e-9)):
                doc = docs[int(j)]
                if spec.use_distance:
                    doc = _with_distance(spec, doc, float(sep_deg[j]) * 3600.0)
                    if doc is None:
                        continue
                results[start + offset].append(_strip_position(doc) if strip else doc)
    return results


def _with_distance(
    spec: XMatchCatalog, doc: dict[str, Any], sep_arcsec: float
) -> dict[str, Any] | None:
    radius, mpc = galaxy_radius_arcsec(spec, doc)
    if sep_arcsec > radius:
        return None
    kpc = mpc * 1000.0 * math.tan(math.radians(sep_arcsec / 3600.0)) if mpc else -1.0
    coords = {**doc.get("coordinates", {}), "distance_arcsec": sep_arcsec, "distance_kpc": kpc}
    return {**doc, "coordinates": coords}


async def cross_match(
    db: AsyncDatabase[dict[str, Any]],
    catalogs: dict[str, XMatchCatalog],
    positions: Sequence[tuple[float, float]],
    only: Sequence[set[str]] | None = None,
) -> list[dict[str, list[dict[str, Any]]]]:
    """`{catalog: [matches]}` per position for every configured catalog (or the subset `only[i]`).
    A catalog that fails (missing, no index) gives [] and a log line, as upstream."""
    out: list[dict[str, list[dict[str, Any]]]] = [{} for _ in positions]
    for catalog, spec in catalogs.items():
        wanted = [i for i in range(len(positions)) if only is None or catalog in only[i]]
        if not wanted:
            continue
        try:
            matches = await match_catalog(db, catalog, spec, [positions[i] for i in wanted])
        except PyMongoError as exc:
            log.warning("cross-match with %s failed: %s", catalog, exc)
            matches = [[] for _ in wanted]
        for i, found in zip(wanted, matches, strict=True):
            out[i][catalog] = found
    return out
