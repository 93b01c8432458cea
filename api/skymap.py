"""Skymaps: PUT/GET/DELETE /api/skymap (cone and polygon localizations) with credible-level
contours stored as GeoJSON MultiPolygons (lon = ra - 180), queried by the `skymap` query type."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
from aiohttp import web

from api.auth import read_body
from api.responses import BadRequest, NotFound, json_response, success
from kowalski.config import Config
from kowalski.coords import parse_dec, parse_ra

DEFAULT_CONTOURS = [90, 95]
RING_POINTS = 72


def parse_dateobs(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if not isinstance(value, str):
        raise BadRequest("dateobs must be an ISO date string like 2023-01-01T00:00:00")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"dateobs: cannot parse {value!r}") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment


def parse_levels(value: Any) -> list[int | float]:
    if value is None:
        return list(DEFAULT_CONTOURS)
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        value = [value]
    try:
        levels = sorted({float(v) for v in value})
    except (TypeError, ValueError):
        raise BadRequest("contours must be numbers in (0, 100]") from None
    if not levels or not all(0 < v <= 100 for v in levels):
        raise BadRequest("contours must be numbers in (0, 100]")
    return [int(v) if v.is_integer() else v for v in levels]


def cone_ring(ra: float, dec: float, radius_deg: float) -> list[list[float]]:
    """Closed ring of points `radius_deg` from (ra, dec), as GeoJSON [lon, lat] (lon = ra - 180)."""
    lat1, lon1, d = math.radians(dec), math.radians(ra), math.radians(radius_deg)
    bearings = np.linspace(0, 2 * math.pi, RING_POINTS, endpoint=False)
    lat2 = np.arcsin(math.sin(lat1) * math.cos(d) + math.cos(lat1) * math.sin(d) * np.cos(bearings))
    lon2 = lon1 + np.arctan2(
        np.sin(bearings) * math.sin(d) * math.cos(lat1), math.cos(d) - math.sin(lat1) * np.sin(lat2)
    )
    ring = [
        [float((math.degrees(lo) % 360.0) - 180.0), float(math.degrees(la))]
        for lo, la in zip(lon2, lat2, strict=True)
    ]
    return [*ring, ring[0]]


def multipolygon(ring: list[list[float]], level: float) -> dict[str, Any]:
    return {
        "type": "MultiPolygon",
        "properties": {"credible_level": level},
        "coordinates": [[ring]],
    }


def contours_for(
    skymap: dict[str, Any], levels: list[int | float]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(localization_name, center, {contourN: MultiPolygon}) for a cone or polygon skymap."""
    if {"ra", "dec", "error"} <= set(skymap):
        try:
            ra, dec = parse_ra(skymap["ra"]), parse_dec(skymap["dec"])
            error = float(skymap["error"])
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"skymap: {exc}") from None
        if not 0 < error <= 90:
            raise BadRequest("skymap.error must be in (0, 90] degrees")
        name = f"{ra:.5f}_{dec:.5f}_{error:.5f}"
        center = {"type": "Point", "coordinates": [ra - 180.0, dec]}
        # Gaussian localization with sigma = error: the p credible radius is sigma*sqrt(-2 ln(1-p))
        contours = {
            f"contour{lvl}": multipolygon(
                cone_ring(
                    ra, dec, min(error * math.sqrt(-2 * math.log(max(1 - lvl / 100, 1e-12))), 89.0)
                ),
                lvl,
            )
            for lvl in levels
        }
        return name, center, contours
    if "polygon" in skymap:
        name = skymap.get("localization_name")
        points = skymap["polygon"]
        if not name or not isinstance(points, list) or len(points) < 3:
            raise BadRequest("a polygon skymap needs localization_name and >= 3 [ra, dec] points")
        try:
            ring = [[parse_ra(p[0]) - 180.0, parse_dec(p[1])] for p in points]
        except (TypeError, ValueError, IndexError) as exc:
            raise BadRequest(f"skymap.polygon: {exc}") from None
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        lon, lat = np.mean([p[0] for p in ring[:-1]]), np.mean([p[1] for p in ring[:-1]])
        center = {"type": "Point", "coordinates": [float(lon), float(lat)]}
        return name, center, {f"contour{lvl}": multipolygon(ring, lvl) for lvl in levels}
    raise BadRequest("skymap must be a cone {ra, dec, error} or {localization_name, polygon}")


def identity(body: dict[str, Any] | Any) -> list[dict[str, Any]]:
    alternatives = []
    if body.get("dateobs"):
        alternatives.append({"dateobs": parse_dateobs(body["dateobs"])})
    if body.get("triggerid") is not None:
        alternatives.append({"triggerid": body["triggerid"]})
    alias = body.get("alias") or body.get("aliases")
    if alias:
        alternatives.append({"aliases": {"$in": alias if isinstance(alias, list) else [alias]}})
    if not alternatives:
        raise BadRequest("give dateobs, triggerid or alias")
    return alternatives


def _skymaps(request: web.Request) -> Any:
    cfg: Config = request.app["config"]
    return request.app["db"][cfg.database.collections["skymaps"]]


async def skymap_put(request: web.Request) -> web.Response:
    """PUT /api/skymap: add a skymap (cone or polygon) with its credible-level contours."""
    body = await read_body(request)
    if "voevent" in body:
        raise BadRequest("VOEvent skymaps are not supported yet: send a cone or polygon skymap")
    if not isinstance(body.get("skymap"), dict):
        raise BadRequest("skymap must be an object")
    dateobs = parse_dateobs(body.get("dateobs"))
    levels = parse_levels(body.get("contours"))
    aliases = body.get("aliases") or []
    aliases = [aliases] if isinstance(aliases, str) else list(aliases)
    name, center, contours = contours_for(body["skymap"], levels)
    coll = _skymaps(request)
    query: dict[str, Any] = {"localization_name": name, "$or": [{"dateobs": dateobs}]}
    if body.get("triggerid") is not None:
        query["$or"].append({"triggerid": body["triggerid"]})
    existing = await coll.find_one(query)
    summary = {"dateobs": dateobs.isoformat(), "localization_name": name}
    if existing:
        have = {k for k in existing.get("contours", {}) if k.startswith("contour")}
        missing = {k: v for k, v in contours.items() if k not in have}
        all_levels = sorted(float(k[7:]) for k in have | set(contours))
        summary["contours"] = [int(v) if v.is_integer() else v for v in all_levels]
        if not missing:
            return json_response(
                {
                    "status": "already_exists",
                    "message": "skymap already exists with these contours",
                    "data": summary,
                },
                status=409,
            )
        await coll.update_one(
            {"_id": existing["_id"]}, {"$set": {f"contours.{k}": v for k, v in missing.items()}}
        )
        return success(
            f"updated skymap for {dateobs.isoformat()} with contours {sorted(missing)}", summary
        )
    doc: dict[str, Any] = {
        "dateobs": dateobs,
        "localization_name": name,
        "aliases": aliases,
        "contours": {"center": center, **contours},
    }
    if body.get("triggerid") is not None:
        doc["triggerid"] = body["triggerid"]
    await coll.insert_one(doc)
    summary["contours"] = levels
    return success(f"added skymap for {dateobs.isoformat()}", summary)


async def skymap_get(request: web.Request) -> web.Response:
    """GET /api/skymap?dateobs|triggerid|alias[&localization_name][&contours=90,95]."""
    params = dict(request.query)
    query: dict[str, Any] = {"$or": identity(params)}
    if params.get("localization_name"):
        query["localization_name"] = params["localization_name"]
    projection = None
    if params.get("contours"):
        projection = {
            "contours.center": 1,
            "dateobs": 1,
            "localization_name": 1,
            "aliases": 1,
            "triggerid": 1,
        }
        projection.update({f"contours.contour{lvl}": 1 for lvl in parse_levels(params["contours"])})
    doc = await _skymaps(request).find_one(query, projection)
    if doc is None:
        raise NotFound("skymap not found")
    doc.pop("_id", None)
    return success("retrieved skymap", doc)


async def skymap_delete(request: web.Request) -> web.Response:
    """DELETE /api/skymap: body {dateobs|triggerid|alias, localization_name}."""
    body = await read_body(request)
    if not body.get("localization_name"):
        raise BadRequest("localization_name is required")
    result = await _skymaps(request).delete_one(
        {"localization_name": body["localization_name"], "$or": identity(body)}
    )
    if result.deleted_count == 0:
        raise NotFound("skymap not found")
    return success("deleted skymap")
