"""GET /api/cutouts/{survey}/{candid}/{cutout}/{file_format}: alert cutouts as FITS or PNG."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from api.policy import data_rights
from api.responses import BadRequest, NotFound, path_int
from api.state import CONFIG, DB
from kowalski.config import Config
from kowalski.cutouts import (
    CMAPS,
    CUTOUTS,
    INTERVALS,
    STRETCHES,
    read_image,
    render_png,
    stamp_bytes,
    write_fits,
)
from kowalski.surveys import UnknownSurvey, survey_for_key


def choice(request: web.Request, name: str, options: tuple[str, ...], default: str) -> str:
    value = request.query.get(name, default)
    if value not in options:
        raise BadRequest(f"{name} must be one of {list(options)}, got {value!r}")
    return value


async def cutout_get(request: web.Request) -> web.Response:
    """GET /api/cutouts/{survey}/{candid}/{cutout}/{fits|png}: an alert cutout."""
    cfg: Config = request.app[CONFIG]
    try:
        survey = survey_for_key(request.match_info["survey"])
    except UnknownSurvey as exc:
        raise BadRequest(str(exc)) from None
    cutout = request.match_info["cutout"].lower()
    file_format = request.match_info["file_format"].lower()
    if cutout not in CUTOUTS:
        raise BadRequest(f"cutout must be one of {list(CUTOUTS)}, got {cutout!r}")
    if file_format not in ("fits", "png"):
        raise BadRequest(f"file_format must be fits or png, got {file_format!r}")
    interval = choice(request, "interval", INTERVALS, "asymmetric_percentile")
    stretch = choice(request, "stretch", STRETCHES, "linear" if cutout == "difference" else "log")
    cmap = choice(request, "cmap", CMAPS, "bone")

    collection = cfg.database.collections.get(survey.alerts_key)
    if not collection:
        raise BadRequest(f"no alert collection configured for {survey.key}")
    field = survey.cutout_field(cutout)
    flt: dict[str, Any] = {
        survey.detection_key: path_int(request, "candid"),
        **(data_rights(request).document_clause(collection) or {}),
    }
    doc = await request.app[DB][collection].find_one(flt, {field: 1})
    if doc is None or not doc.get(field):
        raise NotFound(f"no {cutout} cutout for {survey.key} candid {flt[survey.detection_key]}")
    gz_fits, file_name = stamp_bytes(doc[field])
    loop = asyncio.get_running_loop()
    try:
        data, header = await loop.run_in_executor(
            None, read_image, gz_fits, survey, file_format == "fits"
        )
    except (OSError, ValueError) as exc:
        raise BadRequest(f"stored cutout cannot be read as FITS: {exc}") from None
    if file_format == "fits":
        body = await loop.run_in_executor(None, write_fits, data, header)
        name = (
            file_name or f"{survey.key}_{flt[survey.detection_key]}_{cutout}.fits"
        ).removesuffix(".gz")
        return web.Response(
            body=body,
            content_type="image/fits",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    png = await loop.run_in_executor(None, render_png, data, interval, stretch, cmap)
    return web.Response(body=png, content_type="image/png")
