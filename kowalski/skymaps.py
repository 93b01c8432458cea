"""Sky maps for GW follow-up: VOEvents, multi-order HEALPix localizations and their credible
regions as GeoJSON MultiPolygons (lon = ra - 180) that `$geoWithin` queries can use.

Credible regions come from mocpy (`MOC.from_valued_healpix_cells` with `cumul_to`): the greedy
region, cells sorted by probability density, kept while the cumulative probability stays within
the level (the cell that crosses it is left out, as `ligo.skymap`'s greedy credible levels do).
Each cell of the region becomes one polygon traced along its HEALPix edges, with enough points per
edge (about one per order-6 cell side) that the polygon follows the cell on the sphere and in a
planar (lon, lat) reading alike; cells across the ra = 0 meridian are split there and cells that
touch a pole get a proper polar edge, so both kinds of geometry engine agree on what is inside.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from cdshealpix import nested
from lxml import etree
from mocpy import MOC

from kowalski.config import ROOT
from kowalski.skycells import CELL_ORDER, merge_ranges

VOEVENT_XSD = ROOT / "data" / "skymaps" / "VOEvent-v2.0.xsd"
MAX_ORDER = 29
SEGMENT_DEPTH = 6  # edges are traced with points about one order-6 cell side apart (~0.9 deg)
MAX_SKYMAP_BYTES = 64 * 1024 * 1024
Ring = list[list[float]]


class SkymapError(ValueError):
    """The input is not a usable VOEvent or multi-order sky map; the message says why."""


@dataclass(frozen=True)
class MultiOrderMap:
    """A validated multi-order map: NUNIQ cells and their probabilities (summing to 1)."""

    uniq: np.ndarray
    probability: np.ndarray
    probdensity: np.ndarray


@dataclass
class VOEventInfo:
    dateobs: dt.datetime | None
    triggerid: int | None
    aliases: list[str] = field(default_factory=list)
    skymap: dict[str, Any] | None = None  # {"url": …} or a cone {"ra", "dec", "error"}


# ------------------------------------------------------------------ multi-order maps


def uniq_orders(uniq: np.ndarray) -> np.ndarray:
    """HEALPix order of each NUNIQ index (uniq = 4 * 4**order + ipix), exact for every order."""
    order = np.floor(np.log2(uniq.astype(np.float64))).astype(np.int64) // 2 - 1
    order = np.clip(order, 0, MAX_ORDER)
    too_low = uniq >= (np.uint64(4) << (2 * (order + 1)).astype(np.uint64))
    order[too_low] += 1
    too_high = uniq < (np.uint64(4) << (2 * order).astype(np.uint64))
    order[too_high] -= 1
    return order


def multiorder_map(uniq: Any, probdensity: Any) -> MultiOrderMap:
    """Validate NUNIQ indices and probability densities (per steradian) of a multi-order map."""
    try:
        cells = np.asarray(uniq)
        density = np.asarray(probdensity, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SkymapError(f"uniq and probdensity must be arrays of numbers: {exc}") from None
    if cells.ndim != 1 or density.shape != cells.shape or cells.size == 0:
        raise SkymapError("uniq and probdensity must be non-empty arrays of the same length")
    if not np.issubdtype(cells.dtype, np.integer):
        raise SkymapError("uniq must hold integers (NUNIQ HEALPix indices)")
    if cells.min() < 4 or int(cells.max()) >= 16 * 4**MAX_ORDER:
        raise SkymapError(f"uniq holds indices that are not NUNIQ cells of order 0..{MAX_ORDER}")
    cells = cells.astype(np.uint64)
    if not np.all(np.isfinite(density)) or density.min() < 0:
        raise SkymapError("probdensity must be finite and >= 0")
    order = uniq_orders(cells)
    shift = (2 * (MAX_ORDER - order)).astype(np.uint64)
    ipix = cells - (np.uint64(4) << (2 * order).astype(np.uint64))
    start, end = ipix << shift, (ipix + np.uint64(1)) << shift
    by_start = np.argsort(start)
    if np.any(start[by_start][1:] < end[by_start][:-1]):
        raise SkymapError("uniq holds overlapping or repeated cells")
    probability = density * (4 * math.pi / (12 * 4.0**order))
    total = probability.sum()
    if not total > 0:
        raise SkymapError("the sky map holds no probability")
    return MultiOrderMap(cells, probability / total, density)


def _column(table: fits.FITS_rec, name: str) -> np.ndarray | None:
    names = {n.upper(): n for n in table.columns.names}
    return np.asarray(table[names[name]]) if name in names else None


def read_multiorder_fits(content: bytes) -> MultiOrderMap:
    """The multi-order map in FITS bytes (optionally gzipped): a table of UNIQ, PROBDENSITY."""
    if content[:2] == b"\x1f\x8b":
        inflater = zlib.decompressobj(wbits=31)
        try:
            content = inflater.decompress(content, MAX_SKYMAP_BYTES + 1)
        except zlib.error as exc:
            raise SkymapError(f"sky map: broken gzip data ({exc})") from None
        if len(content) > MAX_SKYMAP_BYTES:
            raise SkymapError(f"sky map larger than {MAX_SKYMAP_BYTES} bytes once unzipped")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(content), memmap=False) as hdus:
                for hdu in hdus[1:]:
                    if not isinstance(hdu, fits.BinTableHDU):
                        continue
                    uniq, density = _column(hdu.data, "UNIQ"), _column(hdu.data, "PROBDENSITY")
                    if uniq is not None and density is not None:
                        return multiorder_map(uniq, density)
    except SkymapError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise SkymapError(f"sky map is not a readable FITS file: {exc}") from None
    raise SkymapError("not a multi-order sky map: no FITS table with UNIQ and PROBDENSITY columns")


# ------------------------------------------------------------------ credible regions → GeoJSON


def _clip(ring: Ring, keep_west: bool) -> Ring:
    """The part of `ring` (open, lon unwrapped past 180) on one side of lon = 180."""

    def inside(p: list[float]) -> bool:
        return p[0] <= 180.0 if keep_west else p[0] >= 180.0

    out: Ring = []
    for i, cur in enumerate(ring):
        prev = ring[i - 1]
        if inside(cur) != inside(prev):
            t = (180.0 - prev[0]) / (cur[0] - prev[0])
            out.append([180.0, prev[1] + t * (cur[1] - prev[1])])
        if inside(cur):
            out.append(cur)
    return out


def _closed(ring: Ring) -> Ring | None:
    """The ring closed, or None when it encloses no area (a sliver on the split line)."""
    if len({(p[0], p[1]) for p in ring}) < 3 or len({p[0] for p in ring}) < 2:
        return None
    return [*ring, ring[0]]


def cell_rings(lon_deg: np.ndarray, lat_deg: np.ndarray) -> list[Ring]:
    """GeoJSON rings (lon = ra - 180) of one cell traced by its edge points (ra, dec in deg)."""
    ring: Ring = []
    n = len(lon_deg)
    for i in range(n):
        if abs(lat_deg[i]) >= 90.0 - 1e-9:  # a pole: the edge along it, at both neighbours' ra
            pole = math.copysign(90.0, lat_deg[i])
            ring += [[lon_deg[i - 1] - 180.0, pole], [lon_deg[(i + 1) % n] - 180.0, pole]]
        else:
            ring.append([lon_deg[i] - 180.0, lat_deg[i]])
    lons = [p[0] for p in ring]
    if max(lons) - min(lons) <= 180.0:
        closed = _closed(ring)
        return [closed] if closed else []
    unwrapped = [[p[0] + 360.0 if p[0] < 0 else p[0], p[1]] for p in ring]
    west = _closed(_clip(unwrapped, keep_west=True))
    east = _closed([[p[0] - 360.0, p[1]] for p in _clip(unwrapped, keep_west=False)])
    return [r for r in (west, east) if r]


def moc_polygons(moc: MOC) -> list[list[Ring]]:
    """GeoJSON MultiPolygon coordinates: one polygon per cell of the MOC."""
    uniq = np.asarray(moc.uniq_hpx, dtype=np.uint64)
    if uniq.size == 0:
        return []
    order = uniq_orders(uniq)
    polygons: list[list[Ring]] = []
    for depth in np.unique(order):
        ipix = uniq[order == depth] - (np.uint64(4) << np.uint64(2 * depth))
        step = 2 ** max(0, SEGMENT_DEPTH - int(depth))
        lon, lat = nested.vertices(ipix, int(depth), step=step)
        lon_deg, lat_deg = lon.to_value("deg"), lat.to_value("deg")
        for row in range(len(ipix)):
            polygons += [[ring] for ring in cell_rings(lon_deg[row], lat_deg[row])]
    return polygons


def multipolygon(coordinates: list[list[Ring]], level: float) -> dict[str, Any]:
    return {
        "type": "MultiPolygon",
        "properties": {"credible_level": level},
        "coordinates": coordinates,
    }


def moc_cell_ranges(moc: MOC) -> list[list[int]]:
    """The MOC as merged inclusive ranges of order-29 nested indices (`coordinates.cell`): a
    cell of order k holds the 4**(29 - k) order-29 indices from ipix << 2(29 - k) on."""
    uniq = np.asarray(moc.uniq_hpx, dtype=np.uint64)
    if uniq.size == 0:
        return []
    order = uniq_orders(uniq).astype(np.uint64)
    ipix = uniq - (np.uint64(4) << (np.uint64(2) * order))
    shift = np.uint64(2) * (np.uint64(CELL_ORDER) - order)
    first = (ipix << shift).astype(np.int64)
    last = (((ipix + np.uint64(1)) << shift) - np.uint64(1)).astype(np.int64)
    return [list(r) for r in merge_ranges(zip(first.tolist(), last.tolist(), strict=True))]


def credible_region(sky: MultiOrderMap, level: float) -> MOC:
    max_depth = int(uniq_orders(sky.uniq).max())
    return MOC.from_valued_healpix_cells(
        sky.uniq, sky.probability, max_depth=max_depth, cumul_from=0.0, cumul_to=level / 100.0
    )


def multiorder_contours(
    sky: MultiOrderMap, levels: list[int | float]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[list[int]]]]:
    """(center Point at the highest probability density, {contourN: MultiPolygon},
    {contourN: the region's order-29 cell ranges})."""
    best = sky.uniq[int(np.argmax(sky.probdensity))]
    depth = int(uniq_orders(np.asarray([best]))[0])
    lon, lat = nested.healpix_to_lonlat(
        np.asarray([best - (np.uint64(4) << np.uint64(2 * depth))]), depth
    )
    center = {
        "type": "Point",
        "coordinates": [float(lon.to_value("deg")[0]) - 180.0, float(lat.to_value("deg")[0])],
    }
    regions = {f"contour{level}": credible_region(sky, level) for level in levels}
    contours = {
        key: multipolygon(moc_polygons(moc), level)
        for (key, moc), level in zip(regions.items(), levels, strict=True)
    }
    return center, contours, {key: moc_cell_ranges(moc) for key, moc in regions.items()}


# ------------------------------------------------------------------ VOEvents


_SCHEMA: etree.XMLSchema | None = None
_SCHEMA_LOCK = threading.Lock()


def voevent_schema(path: Path = VOEVENT_XSD) -> etree.XMLSchema:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = etree.XMLSchema(etree.parse(str(path), etree.XMLParser(no_network=True)))
    return _SCHEMA


def _param(root: etree._Element, name: str) -> str | None:
    element = root.find(f".//Param[@name='{name}']")
    return None if element is None else element.get("value")


def parse_voevent(xml: str | bytes) -> VOEventInfo:
    """Validate a VOEvent 2.0 document (no entity expansion, no network) and read its event time,
    trigger id, aliases and localization (a sky map URL, else an error cone)."""
    data = xml.encode() if isinstance(xml, str) else xml
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise SkymapError(f"xml file is not valid VOEvent: {exc}") from None
    if root.getroottree().docinfo.doctype:
        raise SkymapError("xml file is not valid VOEvent: a DOCTYPE is not allowed")
    schema = voevent_schema()
    try:
        with _SCHEMA_LOCK:  # one validation at a time: the error log lives on the schema
            valid = schema.validate(root)
            last_error = schema.error_log.last_error
    except etree.XMLSchemaValidateError as exc:
        raise SkymapError(f"xml file is not valid VOEvent: {exc}") from None
    if not valid:
        raise SkymapError(f"xml file is not valid VOEvent: {last_error}")
    return VOEventInfo(
        dateobs=_voevent_dateobs(root),
        triggerid=_voevent_trigger(root),
        aliases=[f"LVC#{grace}"] if (grace := _param(root, "GraceID")) else [],
        skymap=_voevent_localization(root),
    )


def _voevent_dateobs(root: etree._Element) -> dt.datetime | None:
    text = root.findtext(
        "./WhereWhen/ObsDataLocation/ObservationLocation/AstroCoords/Time/TimeInstant/ISOTime"
    )
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SkymapError(f"VOEvent ISOTime {text!r} is not an ISO date") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    rounded = moment.replace(microsecond=0)
    return rounded + dt.timedelta(seconds=1) if moment.microsecond >= 500_000 else rounded


def _voevent_trigger(root: etree._Element) -> int | None:
    value = _param(root, "TrigID")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise SkymapError(f"VOEvent TrigID {value!r} is not an integer") from None


def _voevent_localization(root: etree._Element) -> dict[str, Any] | None:
    url = root.find("./What/Group[@type='GW_SKYMAP']/Param[@name='skymap_fits']")
    if url is not None and url.get("value"):
        return {"url": url.get("value")}
    position = "./WhereWhen/ObsDataLocation/ObservationLocation/AstroCoords/Position2D"
    ra = root.findtext(f"{position}/Value2/C1")
    dec = root.findtext(f"{position}/Value2/C2")
    error = root.findtext(f"{position}/Error2Radius")
    if ra and dec and error:
        try:
            return {"ra": float(ra), "dec": float(dec), "error": float(error)}
        except ValueError:
            raise SkymapError("VOEvent position is not numeric") from None
    return None
