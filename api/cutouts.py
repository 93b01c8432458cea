"""GET /api/cutouts/{survey}/{candid}/{cutout}/{file_format}: alert cutouts as FITS or PNG."""

from __future__ import annotations

import asyncio
import gzip
import io
from typing import Any

import numpy as np
from aiohttp import web

from api.policy import data_rights
from api.responses import BadRequest, NotFound, path_int
from kowalski.config import Config
from kowalski.fits import read_stamp
from kowalski.surveys import Orientation, Survey, UnknownSurvey, survey_for_key

CUTOUTS = ("science", "template", "difference")
INTERVALS = ("min_max", "zscale", "asymmetric_percentile")
STRETCHES = ("linear", "log", "asinh", "sqrt")
CMAPS = ("bone", "gray", "cividis", "viridis", "magma")


def stamp_bytes(value: Any) -> tuple[bytes, str | None]:
    """(gzipped FITS bytes, original file name) from a stored cutout (dict or raw bytes)."""
    if isinstance(value, dict):
        return bytes(value.get("stampData", b"")), value.get("fileName")
    return bytes(value or b""), None


def read_image(gz_fits: bytes, survey: Survey, with_header: bool) -> tuple[np.ndarray, Any]:
    """The oriented image (and, for FITS downloads, the astropy header)."""
    header = None
    if with_header:
        from astropy.io import fits

        raw = gzip.decompress(gz_fits) if gz_fits[:2] == b"\x1f\x8b" else gz_fits
        with fits.open(io.BytesIO(raw), ignore_missing_simple=True) as hdul:
            data = np.array(hdul[0].data, dtype=np.float64)
            header = hdul[0].header.copy()
    else:
        data = np.asarray(read_stamp(gz_fits), dtype=np.float64)
    return orient(data, survey.orientation), header


def orient(data: np.ndarray, orientation: Orientation) -> np.ndarray:
    """North up, east left, as upstream shows each survey's cutouts."""
    if orientation == "flipud":
        return np.flipud(data)
    if orientation == "rot270_fliplr":
        return np.rot90(np.fliplr(data), 3)
    return data


def render_png(data: np.ndarray, interval: str, stretch: str, cmap: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from astropy.visualization import (
        AsinhStretch,
        AsymmetricPercentileInterval,
        ImageNormalize,
        LinearStretch,
        LogStretch,
        MinMaxInterval,
        SqrtStretch,
        ZScaleInterval,
    )
    from matplotlib.figure import Figure

    img = np.array(data, dtype=np.float64)
    img[np.abs(img) > 1e20] = np.nan
    if np.isnan(img).all():
        img = np.zeros_like(img)
    img[np.isnan(img)] = np.nanmean(img)
    limits = {
        "min_max": MinMaxInterval(),
        "zscale": ZScaleInterval(),
        "asymmetric_percentile": AsymmetricPercentileInterval(1, 100),
    }[interval]
    stretcher = {
        "linear": LinearStretch(),
        "log": LogStretch(),
        "asinh": AsinhStretch(),
        "sqrt": SqrtStretch(),
    }[stretch]
    norm = ImageNormalize(img, interval=limits, stretch=stretcher)
    fig = Figure(figsize=(4, 4), dpi=42)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(img, origin="lower", cmap=cmap, norm=norm)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=42)
    return out.getvalue()


def write_fits(data: np.ndarray, header: Any) -> bytes:
    from astropy.io import fits

    out = io.BytesIO()
    fits.PrimaryHDU(data=data, header=header).writeto(out)
    return out.getvalue()


def choice(request: web.Request, name: str, options: tuple[str, ...], default: str) -> str:
    value = request.query.get(name, default)
    if value not in options:
        raise BadRequest(f"{name} must be one of {list(options)}, got {value!r}")
    return value


async def cutout_get(request: web.Request) -> web.Response:
    """GET /api/cutouts/{survey}/{candid}/{cutout}/{fits|png}."""
    cfg: Config = request.app["config"]
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
    doc = await request.app["db"][collection].find_one(flt, {field: 1})
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
