"""Sky cells: an integer per position so that cone searches can use an ordinary B-tree index.

Every document with `coordinates.radec_geojson` also carries `coordinates.cell`, its HEALPix
*nested* index at order 29 (int64; cells of ~0.4 mas). In the nested scheme the order-29 indices
inside a coarser cell form one contiguous range, so a cone covered by a few coarse cells (a MOC)
is a few `$gte/$lte` ranges on the cell field. The ranges are a superset of the cone: queries
AND them with `$geoWithin/$centerSphere`, which stays the exact test (see kowalski/cones.py).

HEALPix via `cdshealpix` (CDS, Rust core): exact nested hashing and a cone coverage that never
misses a cell the cone touches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import Latitude, Longitude
from cdshealpix import nested

CELL_KEY = "cell"  # inside the `coordinates` sub-document
CELL_FIELD = f"coordinates.{CELL_KEY}"
CELL_ORDER = 29
CELL_INDEX_NAME = "coordinates_cell"
CELL_INDEX: list[tuple[str, int | str]] = [(CELL_FIELD, 1)]
MAX_RANGES = 8
COVER_DEPTH_DELTA = 2  # cdshealpix refines its cover this many orders deeper (at most 29)
MAX_COVER_ORDER = CELL_ORDER - COVER_DEPTH_DELTA
# cone coverage is computed for a radius this much larger, so a point on the cone's edge (where
# $geoWithin and the coverage may round differently) is never cut by the cell ranges
COVER_MARGIN_RAD = 1e-9
# mean side of a HEALPix cell at order 0, in radians (sqrt(4 pi / 12))
ORDER0_SIDE_RAD = math.sqrt(math.pi / 3)
_THREADS = 1  # one call per batch; no thread pool for a handful of positions

Range = tuple[int, int]


def sky_cells(ra: Any, dec: Any) -> np.ndarray:
    """Order-29 nested HEALPix indices (int64) of positions in degrees (array-like)."""
    ra_arr = np.atleast_1d(np.asarray(ra, dtype=float)) % 360.0
    dec_arr = np.clip(np.atleast_1d(np.asarray(dec, dtype=float)), -90.0, 90.0)
    if ra_arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    ipix = nested.lonlat_to_healpix(
        Longitude(ra_arr, u.deg), Latitude(dec_arr, u.deg), CELL_ORDER, num_threads=_THREADS
    )
    cells: np.ndarray = ipix.astype(np.int64)
    return cells


def sky_cell(ra: float, dec: float) -> int:
    """Order-29 nested HEALPix index of one position in degrees."""
    return int(sky_cells(ra, dec)[0])


def add_cells(docs: Sequence[dict[str, Any]]) -> None:
    """Set `coordinates.cell` (in place) on the documents that have `coordinates.radec_geojson`,
    from that point (longitude = ra - 180); one vectorised call for the whole batch."""
    located = [d for d in docs if "radec_geojson" in (d.get("coordinates") or {})]
    if not located:
        return
    lonlat = np.array(
        [d["coordinates"]["radec_geojson"]["coordinates"] for d in located], dtype=float
    )
    for doc, cell in zip(located, sky_cells(lonlat[:, 0] + 180.0, lonlat[:, 1]), strict=True):
        doc["coordinates"][CELL_KEY] = int(cell)


def cover_order(radius_rad: float) -> int:
    """The coarse order whose cells are about half the cone's radius (a few ranges per cone)."""
    if radius_rad <= 0:
        return MAX_COVER_ORDER
    order = math.floor(math.log2(ORDER0_SIDE_RAD / radius_rad)) + 1
    return max(0, min(MAX_COVER_ORDER, order))


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with overlapping or adjacent ranges joined."""
    out: list[Range] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _moc_ranges(ra: float, dec: float, radius_rad: float, order: int) -> list[Range]:
    ipix, depth, _ = nested.cone_search(
        Longitude(ra % 360.0, u.deg),
        Latitude(max(-90.0, min(90.0, dec)), u.deg),
        (radius_rad + COVER_MARGIN_RAD) * u.rad,
        depth=order,
        depth_delta=COVER_DEPTH_DELTA,
    )
    shift = 2 * (CELL_ORDER - depth.astype(np.int64))
    first = ipix.astype(np.int64) << shift
    last = ((ipix.astype(np.int64) + 1) << shift) - 1
    return merge_ranges(zip(first.tolist(), last.tolist(), strict=True))


def cone_ranges(
    ra: float, dec: float, radius_rad: float, max_ranges: int = MAX_RANGES
) -> list[Range]:
    """Inclusive order-29 cell ranges covering the cone (degrees, radius in radians): at most
    `max_ranges`, coarser cells when a finer cover would need more."""
    if radius_rad >= math.pi:
        return [(0, 12 * 4**CELL_ORDER - 1)]
    order = cover_order(radius_rad)
    ranges = _moc_ranges(ra, dec, radius_rad, order)
    while len(ranges) > max_ranges and order > 0:
        order -= 1
        ranges = _moc_ranges(ra, dec, radius_rad, order)
    return ranges


def ranges_clause(ranges: Sequence[Range]) -> dict[str, Any]:
    """`{$or: [{cell: {$gte: a, $lte: b}}, ...]}` (a bare range when there is one)."""
    clauses = [{CELL_FIELD: {"$gte": low, "$lte": high}} for low, high in ranges]
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def cone_cell_clause(ra: float, dec: float, radius_rad: float) -> dict[str, Any]:
    """The cell-range pre-selection of a cone (AND it with the exact `$geoWithin`)."""
    return ranges_clause(cone_ranges(ra, dec, radius_rad))


def cones_cell_clause(
    positions: Sequence[tuple[float, float]], radius_rad: float
) -> dict[str, Any]:
    """The merged cell ranges of several cones of one radius, as one clause."""
    return ranges_clause(
        merge_ranges(r for ra, dec in positions for r in cone_ranges(ra, dec, radius_rad))
    )


def is_cell_index(keys: Sequence[Sequence[Any]]) -> bool:
    """Whether an index's key pattern starts with the cell field (usable for range scans)."""
    return bool(keys) and keys[0][0] == CELL_FIELD
