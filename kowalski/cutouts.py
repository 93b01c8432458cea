"""Cutout images: stored stamps read, oriented as each survey's viewers show them, and rendered as
PNG or FITS. Shared by the API's cutout route and the SkyPortal feed's thumbnails."""

from __future__ import annotations

import gzip
import io
from typing import Any

import numpy as np

from kowalski.fits import read_stamp
from kowalski.surveys import Orientation, Survey

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
