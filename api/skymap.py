"""Skymaps: PUT/GET/DELETE /api/skymap with credible-level contours stored as GeoJSON
MultiPolygons (lon = ra - 180), queried by the `skymap` query type.

PUT (admin only) takes a VOEvent (`{"voevent": "<xml>"}`, its multi-order FITS fetched from the URL
it names) or a `skymap` object: a multi-order map (`localization_name` + `uniq`/`probdensity`, or
`url`), a cone (`ra`, `dec`, `error`) or a polygon (`localization_name` + `polygon`). Answers follow
upstream Kowalski: dates as ISO strings, 409 `already_exists`, and a missing skymap is HTTP 200
`{"status": "error", "message": "no skymap found"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import math
import os
import socket
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np
from aiohttp import web
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DocumentTooLarge, DuplicateKeyError, WriteError
from yarl import URL

from api.auth import admin_required
from api.bodies import read_body
from api.models import SkymapPut, parse, parse_dateobs, parse_levels, plain_triggerid, text
from api.responses import BadRequest, json_response, success
from api.state import CONFIG, collection
from kowalski.config import IPNetwork
from kowalski.coords import parse_dec, parse_ra
from kowalski.skymaps import (
    MAX_SKYMAP_BYTES,
    SkymapError,
    VOEventInfo,
    multiorder_contours,
    multiorder_map,
    multipolygon,
    parse_voevent,
    read_multiorder_fits,
)

RING_POINTS = 72
FETCH_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
NO_SKYMAP = "no skymap found"
# (localization_name, center, {contourN: MultiPolygon}, {contourN: order-29 cell ranges}); the
# ranges (multi-order maps only) are stored apart under `cells` so GET answers as upstream does
Contours = tuple[str, dict[str, Any], dict[str, Any], dict[str, list[list[int]]]]
CELLS = "cells"


# ------------------------------------------------------------------ cones and polygons


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


def cone_contours(skymap: dict[str, Any], levels: list[int | float]) -> Contours:
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
            [
                [
                    cone_ring(
                        ra,
                        dec,
                        min(error * math.sqrt(-2 * math.log(max(1 - lvl / 100, 1e-12))), 89.0),
                    )
                ]
            ],
            lvl,
        )
        for lvl in levels
    }
    return name, center, contours, {}


def polygon_contours(skymap: dict[str, Any], levels: list[int | float]) -> Contours:
    name = skymap.get("localization_name")
    points = skymap["polygon"]
    if not isinstance(name, str) or not name or not isinstance(points, list) or len(points) < 3:
        raise BadRequest("a polygon skymap needs localization_name and >= 3 [ra, dec] points")
    try:
        ring = [[parse_ra(p[0]) - 180.0, parse_dec(p[1])] for p in points]
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise BadRequest(f"skymap.polygon: {exc}") from None
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    lon, lat = np.mean([p[0] for p in ring[:-1]]), np.mean([p[1] for p in ring[:-1]])
    center = {"type": "Point", "coordinates": [float(lon), float(lat)]}
    return name, center, {f"contour{lvl}": multipolygon([[ring]], lvl) for lvl in levels}, {}


# ------------------------------------------------------------------ multi-order maps


Networks = tuple[IPNetwork, ...]


class RefusedAddress(OSError):
    """A sky map URL's host is (or resolves to) an address the API may not fetch from."""


def fetchable(address: str, allow: Networks) -> bool:
    """Public addresses, and those of the allow-listed networks: never private, loopback,
    link-local or otherwise internal ones (IPv4-mapped IPv6 judged as its IPv4 address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global or any(ip in network for network in allow)


def check_addresses(host: str, addresses: list[str], allow: Networks) -> None:
    refused = sorted({a for a in addresses if not fetchable(a, allow)})
    if refused:
        raise RefusedAddress(
            f"{host} is (or resolves to) the internal address {refused[0]}: sky maps are not "
            "fetched from private, loopback or link-local addresses unless the network is in "
            "server.skymap_fetch_allow"
        )


class CheckedResolver(ThreadedResolver):
    """Resolves names as usual and refuses them when any of their addresses is internal, at
    connection time (so a name cannot change its answer between a check and the fetch)."""

    def __init__(self, allow: Networks) -> None:
        super().__init__()
        self.allow = allow

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await super().resolve(host, port, family)
        check_addresses(host, [r["host"] for r in results], self.allow)
        return results


def check_url(url: URL, allow: Networks) -> None:
    """http(s) only; an address given literally (never resolved) is checked here."""
    if url.scheme not in ("http", "https") or not url.host:
        raise BadRequest("skymap url must be an http(s) URL")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(url.host.split("%", 1)[0])
        try:
            check_addresses(url.host, [url.host], allow)
        except RefusedAddress as exc:
            raise BadRequest(f"could not fetch skymap from {url}: {exc}") from None


async def read_limited(response: aiohttp.ClientResponse, url: URL) -> bytes:
    if response.status != 200:
        raise BadRequest(f"could not fetch skymap from {url}: HTTP {response.status}")
    content = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        content += chunk
        if len(content) > MAX_SKYMAP_BYTES:
            raise BadRequest(f"skymap at {url} is larger than {MAX_SKYMAP_BYTES} bytes")
    return bytes(content)


async def fetch_skymap(url: Any, allow: Networks = ()) -> bytes:
    """GET a sky map file: http(s) only, from public addresses (or allow-listed networks), each
    redirect checked as the first URL; a time limit and a size limit; any failure is a 400."""
    if not isinstance(url, str):
        raise BadRequest("skymap url must be an http(s) URL")
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    connector = aiohttp.TCPConnector(resolver=CheckedResolver(allow))
    try:
        target = URL(url)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            for _ in range(MAX_REDIRECTS + 1):
                check_url(target, allow)
                async with session.get(target, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status not in REDIRECTS or not location:
                        return await read_limited(response, target)
                    target = target.join(URL(location))
        raise BadRequest(f"could not fetch skymap from {url}: more than {MAX_REDIRECTS} redirects")
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
        raise BadRequest(f"could not fetch skymap from {url}: {fetch_error(exc)}") from None


def fetch_error(exc: Exception) -> str:
    """Why a fetch failed, in words (a refused address says which, not just 'cannot connect')."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, RefusedAddress):
        return str(exc.os_error)
    return str(exc) or type(exc).__name__


def url_name(url: str) -> str:
    """The localization name upstream gives a sky map fetched from a URL: the file's name."""
    return os.path.basename(urlparse(url).path)


async def multiorder_from_url(
    url: Any, levels: list[int | float], allow: Networks = ()
) -> Contours:
    content = await fetch_skymap(url, allow)
    try:
        sky = await asyncio.to_thread(read_multiorder_fits, content)
        center, contours, cells = await asyncio.to_thread(multiorder_contours, sky, levels)
    except SkymapError as exc:
        raise BadRequest(f"skymap at {url}: {exc}") from None
    return url_name(url), center, contours, cells


async def multiorder_from_arrays(skymap: dict[str, Any], levels: list[int | float]) -> Contours:
    name = text(skymap.get("localization_name"), "skymap.localization_name")
    try:
        sky = multiorder_map(skymap["uniq"], skymap["probdensity"])
        center, contours, cells = await asyncio.to_thread(multiorder_contours, sky, levels)
    except SkymapError as exc:
        raise BadRequest(f"skymap: {exc}") from None
    return name, center, contours, cells


async def contours_for(
    skymap: dict[str, Any], levels: list[int | float], allow: Networks = ()
) -> Contours:
    """The Contours of any accepted skymap form (`allow`: the internal networks a sky map URL
    may point to)."""
    if {"uniq", "probdensity"} <= set(skymap):
        return await multiorder_from_arrays(skymap, levels)
    if "url" in skymap:
        return await multiorder_from_url(skymap["url"], levels, allow)
    if {"ra", "dec", "error"} <= set(skymap):
        return cone_contours(skymap, levels)
    if "polygon" in skymap:
        return polygon_contours(skymap, levels)
    raise BadRequest(
        "skymap must be a multi-order map {localization_name, uniq, probdensity} or {url}, "
        "a cone {ra, dec, error} or {localization_name, polygon}"
    )


async def read_voevent(xml: Any) -> VOEventInfo:
    if not isinstance(xml, str | bytes) or not xml:
        raise BadRequest("voevent must be the VOEvent XML as a string")
    try:
        info = await asyncio.to_thread(parse_voevent, xml)
    except SkymapError as exc:
        raise BadRequest(str(exc)) from None
    if info.skymap is None:
        raise BadRequest("Could not get skymap from VOEvent file")
    return info


# ------------------------------------------------------------------ handlers


def _skymaps(request: web.Request) -> AsyncCollection[dict[str, Any]]:
    return collection(request, "skymaps")


def level_list(names: Any) -> list[int | float]:
    values = sorted(float(k[len("contour") :]) for k in names if k.startswith("contour"))
    return [int(v) if v.is_integer() else v for v in values]


def lookup(dateobs: dt.datetime, name: str, triggerid: Any, aliases: list[str]) -> dict[str, Any]:
    """The same skymap as upstream sees it: same name, and same dateobs, triggerid or aliases."""
    same: list[dict[str, Any]] = [{"dateobs": dateobs}]
    if triggerid not in (None, ""):
        same.append({"triggerid": triggerid})
    if aliases:
        same.append(
            {"$and": [{"aliases": {"$all": aliases}}, {"aliases": {"$size": len(aliases)}}]}
        )
    return {"localization_name": name, "$or": same}


@admin_required
async def skymap_put(request: web.Request) -> web.Response:
    """PUT /api/skymap: add a skymap with its credible-level contours (admin only)."""
    body = parse(SkymapPut, await read_body(request))
    levels, aliases, triggerid, dateobs = body.contours, body.aliases, body.triggerid, body.dateobs
    if "voevent" in body.model_fields_set:
        info = await read_voevent(body.voevent)
        dateobs = dateobs or info.dateobs
        triggerid = info.triggerid
        aliases += [a for a in info.aliases if a not in aliases]
        source = info.skymap or {}
    else:
        source = body.skymap
    if dateobs is None:
        raise BadRequest("dateobs is required in the request body or the VOEvent")
    allow = request.app[CONFIG].server.skymap_fetch_allow
    name, center, contours, cells = await contours_for(source, levels, allow)
    coll = _skymaps(request)
    existing = await coll.find_one(lookup(dateobs, name, triggerid, aliases))
    summary: dict[str, Any] = {"dateobs": dateobs.isoformat(), "localization_name": name}
    if existing:
        return await add_levels(coll, existing, (contours, cells), dateobs, summary)
    doc: dict[str, Any] = {
        "dateobs": dateobs,
        "localization_name": name,
        "aliases": aliases,
        "contours": {"center": center, **contours},
    }
    if cells:
        doc[CELLS] = cells
    if triggerid is not None:
        doc["triggerid"] = triggerid
    try:
        await coll.insert_one(doc)
    except DuplicateKeyError:  # the same skymap stored meanwhile by another request
        return already_exists({**summary, "contours": levels})
    except DocumentTooLarge as exc:
        raise BadRequest(f"{TOO_LARGE}: {exc}") from None
    summary["contours"] = levels
    return success(f"added skymap for {dateobs} with contours {levels}", summary)


TOO_LARGE = "the contours of this skymap are too large to store in one document"


def already_exists(summary: dict[str, Any]) -> web.Response:
    return json_response(
        {
            "status": "already_exists",
            "message": "skymap already exists with the same contours",
            "data": summary,
        },
        status=409,
    )


async def add_levels(
    coll: Any,
    existing: dict[str, Any],
    levels: tuple[dict[str, Any], dict[str, list[list[int]]]],
    dateobs: dt.datetime,
    summary: dict[str, Any],
) -> web.Response:
    """Add the requested levels a stored skymap lacks (409 when it has them all, as upstream):
    (contours, cells) as contours_for gives them."""
    contours, cells = levels
    have = existing.get("contours", {})
    missing = {k: v for k, v in contours.items() if k not in have}
    update = {f"contours.{k}": v for k, v in missing.items()}
    update |= {f"{CELLS}.{k}": cells[k] for k in missing if k in cells}
    summary["contours"] = level_list([*have, *missing])
    if not missing:
        return already_exists(summary)
    try:
        await coll.update_one({"_id": existing["_id"]}, {"$set": update})
    except (DocumentTooLarge, WriteError) as exc:
        raise BadRequest(f"{TOO_LARGE}: {exc}") from None
    return success(f"updated skymap for {dateobs} to add contours {level_list(missing)}", summary)


def identity(params: dict[str, Any]) -> dict[str, Any]:
    """GET/DELETE selection (as upstream: every given identifier must match), plain values only."""
    query: dict[str, Any] = {}
    if params.get("dateobs") is not None:
        query["dateobs"] = parse_dateobs(params["dateobs"])
    if params.get("triggerid") is not None:
        query["triggerid"] = plain_triggerid(params["triggerid"])
    if params.get("alias") is not None:
        query["aliases"] = text(params["alias"], "alias")
    if not query:
        raise BadRequest("must provide dateobs, triggerid, or alias")
    if params.get("localization_name") is not None:
        query["localization_name"] = text(params["localization_name"], "localization_name")
    return query


def _triggerid_param(params: dict[str, Any]) -> dict[str, Any]:
    """A query-string triggerid is text; stored trigger ids are usually integers: match both."""
    raw = params.get("triggerid")
    if isinstance(raw, str) and raw.lstrip("-").isdigit():
        return {"triggerid": {"$in": [raw, int(raw)]}}
    return {}


async def skymap_get(request: web.Request) -> web.Response:
    """GET /api/skymap: a stored skymap, by dateobs, triggerid or alias (query parameters;
    localization_name and contours=90,95 optional)."""
    params = dict(request.query)
    query = {**identity(params), **_triggerid_param(params)}
    doc = await _skymaps(request).find_one(query)
    if doc is None:
        return json_response({"status": "error", "message": NO_SKYMAP})
    if params.get("contours"):
        wanted = parse_levels(params["contours"])
        missing = [lvl for lvl in wanted if f"contour{lvl}" not in doc.get("contours", {})]
        if missing:
            message = f"skymap exists but is missing contours {missing}"
            return json_response({"status": "error", "message": message})
    doc.pop("_id", None)
    doc.pop(CELLS, None)
    doc["dateobs"] = doc["dateobs"].isoformat()
    return json_response({"status": "success", "data": doc})


@admin_required
async def skymap_delete(request: web.Request) -> web.Response:
    """DELETE /api/skymap: body {dateobs|triggerid|alias, localization_name} (admin only)."""
    body = await read_body(request)
    text(body.get("localization_name"), "localization_name")
    result = await _skymaps(request).delete_one(identity(body))
    if result.deleted_count == 0:
        return json_response({"status": "error", "message": NO_SKYMAP})
    return success(f"deleted {result.deleted_count} skymap")
