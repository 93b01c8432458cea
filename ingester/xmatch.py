"""Stage: cross-match a batch of positions against the configured catalogs.

One query per catalog per 64 positions of a batch, the catalogs' queries concurrently
(kowalski/cones.py: merged sky-cell ranges, or an `$or` of `$geoWithin/$centerSphere` cones on
`coordinates.radec_geojson`), matches assigned to each position by great-circle distance.
Distance-based catalogs (CLU, NED) use a coarse cone, then a per-galaxy radius.

A catalog whose query fails is never reported as "no match": if the database refuses the query
(bad configured filter, ...) the catalog is left out of the answer (and named in `failed`), so it
stays absent from the object's `cross_matches` and is matched again with the object's next alert;
if the database is unreachable the error propagates and the batch is retried.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from ingester.archive import ONE_REPLY, database_unavailable
from kowalski import cones
from kowalski.cones import projection_with_position
from kowalski.config import XMatchCatalog
from kowalski.coords import RADIUS_TO_RAD

log = logging.getLogger("kowalski.ingester.xmatch")

SPEED_OF_LIGHT_KMS = 299792.458
HUBBLE_CONSTANT = 67.66  # km/s/Mpc


def galaxy_radius_arcsec(spec: XMatchCatalog, doc: dict[str, Any]) -> tuple[float, float | None]:
    """(match radius in arcsec, distance in Mpc or None) for a distance-based catalog row."""
    value = doc.get(spec.distance_value or "")
    low = spec.cm_low_distance or 0.0
    at = spec.cm_at_distance or 0.0
    if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
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
    # a configured projection hiding the position is overridden: matching needs it
    projection, strip = projection_with_position(spec.projection or None) or (
        {**spec.projection, "coordinates.radec_geojson": 1},
        True,
    )

    async def find(query: dict[str, Any], sort: cones.Sort | None) -> list[dict[str, Any]]:
        cursor = db[catalog].find(query, projection, batch_size=ONE_REPLY, sort=sort)
        return await cursor.to_list()

    results: list[list[dict[str, Any]]] = []
    cells = await cones.has_cells(db[catalog])
    for matches in await cones.search(find, positions, radius_rad, spec.filter, cells):
        kept = []
        for doc, sep_deg in matches:
            if spec.use_distance:
                with_distance = _with_distance(spec, doc, sep_deg * 3600.0)
                if with_distance is None:
                    continue
                doc = with_distance
            kept.append(cones.strip_position(doc) if strip else doc)
        results.append(kept)
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


@dataclass
class CrossMatches:
    """`{catalog: [matches]}` per position (only catalogs that answered), and the catalogs that
    failed with their errors."""

    matches: list[dict[str, list[dict[str, Any]]]]
    failed: dict[str, str] = field(default_factory=dict)


async def cross_match(
    db: AsyncDatabase[dict[str, Any]],
    catalogs: dict[str, XMatchCatalog],
    positions: Sequence[tuple[float, float]],
    only: Sequence[set[str]] | None = None,
) -> CrossMatches:
    """Matches per position for every configured catalog (or the subset `only[i]`). A catalog the
    database refuses to query is left out and named in `failed`; connection errors propagate."""
    result = CrossMatches([{} for _ in positions])
    wanted = {
        catalog: [i for i in range(len(positions)) if only is None or catalog in only[i]]
        for catalog in catalogs
    }
    asked = [catalog for catalog, indices in wanted.items() if indices]
    # the catalogs' queries run concurrently: the batch waits for the slowest, not for the sum
    answers = await asyncio.gather(
        *(match_catalog(db, c, catalogs[c], [positions[i] for i in wanted[c]]) for c in asked),
        return_exceptions=True,
    )
    for catalog, answer in zip(asked, answers, strict=True):
        if isinstance(answer, OperationFailure) and not database_unavailable(answer):
            log.error(
                "cross-match with %s failed (left unmatched, retried later): %s", catalog, answer
            )
            result.failed[catalog] = str(answer)
            continue
        if isinstance(answer, BaseException):
            raise answer
        for i, found in zip(wanted[catalog], answer, strict=True):
            result.matches[i][catalog] = found
    return result
