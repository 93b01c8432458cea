"""Light curves as SkyPortal photometry (upstream `make_photometry` / `alert_put_photometry`).

Alert points (candidate + prv_candidates): µJy fluxes at zp 23.9 AB from magpsf/sigmapsf, signed
by `isdiffpos`; non-detections carry flux None and a 5-sigma fluxerr from diffmaglim; `origin` None.
Forced points (ZTF fp_hists, procstatus 0): flux/fluxerr from forcediffimflux(unc) at zp =
magzpsci, flux None when SNR <= 3 or missing; `origin` "alert_fp". One PUT body per SkyPortal
stream and origin.

Flux surveys (Rubin/LSST, DECam; `SkyPortalSpec.flux_zp`): psfFlux/psfFluxErr in nJy are posted
as they are at zp 31.4 AB, for alert points and forced points alike (a forced point with SNR <= 3
as a non-detection: flux None, its error kept).

Per survey (the registry's `SkyPortalSpec`): the SkyPortal instrument name, the filter names, and
which stream each point goes to (ZTF: by programid; the others: the one stream matching the
survey's rule). Entries name streams by label; ids are filled in at delivery.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from kowalski.documents import Doc
from kowalski.surveys import SkyPortalSpec

ZP_AB = 23.9
MJD_OFFSET = 2400000.5
POSITIVE = (True, 1, "1", "y", "Y", "t", "T")
FORCED_ORIGIN = "alert_fp"
SNR_DETECTED = 3.0  # forced points at or below this SNR are posted as non-detections


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)


def flux_points(spec: SkyPortalSpec, points: Iterable[Doc], origin: str | None) -> list[Doc]:
    """Points carrying nJy fluxes (Rubin/LSST, DECam), posted at the survey's zero point;
    deduplicated on (jd, filter)."""
    zp = float(spec.flux_zp or 0.0)
    seen: set[tuple[Any, ...]] = set()
    out = []
    for p in points:
        jd, band = _number(p.get("jd")), spec.filter_of(p.get(spec.band_key))
        flux, err = _number(p.get("psfFlux")), _number(p.get("psfFluxErr"))
        if jd is None or band is None or err is None or err <= 0 or (jd, band) in seen:
            continue
        seen.add((jd, band))
        if origin is not None and flux is not None and flux / err <= SNR_DETECTED:
            flux = None
        ra, dec = (None, None) if origin else (_number(p.get("ra")), _number(p.get("dec")))
        out.append(_point(p, jd, flux, err, zp, band, origin, ra, dec))
    return out


def alert_points(spec: SkyPortalSpec, detections: Iterable[Doc]) -> list[Doc]:
    """Candidates and prv_candidates as photometry points (deduplicated on mjd, mag, filter)."""
    if spec.flux_zp is not None:
        return flux_points(spec, detections, None)
    seen: set[tuple[Any, ...]] = set()
    out = []
    for p in detections:
        jd, band = _number(p.get("jd")), spec.filter_of(p.get(spec.band_key))
        limit = _number(p.get("diffmaglim"))
        if jd is None or band is None or (limit is not None and limit <= 0):
            continue
        mag, sigma = _number(p.get("magpsf")), _number(p.get("sigmapsf"))
        key = (jd, mag, band)
        if key in seen:
            continue
        seen.add(key)
        if mag is not None:
            flux = 10 ** (-0.4 * (mag - ZP_AB)) * (1 if p.get("isdiffpos") in POSITIVE else -1)
            fluxerr = abs((sigma or 0.0) * flux * math.log(10) / 2.5)
            point_flux: float | None = flux
        elif limit is not None:
            point_flux, fluxerr = None, 10 ** (-0.4 * (limit - ZP_AB)) / 5
        else:
            continue
        out.append(
            _point(
                p,
                jd,
                point_flux,
                fluxerr,
                ZP_AB,
                band,
                None,
                _number(p.get("ra")),
                _number(p.get("dec")),
            )
        )
    return out


def forced_points(spec: SkyPortalSpec, fp_hists: Iterable[Doc]) -> list[Doc]:
    """Stored forced photometry (procstatus 0, diffmaglim > 0) as points of origin alert_fp."""
    if spec.flux_zp is not None:
        return flux_points(spec, fp_hists, FORCED_ORIGIN)
    seen: set[tuple[Any, ...]] = set()
    out = []
    for p in fp_hists:
        jd, band, zp = (
            _number(p.get("jd")),
            spec.filter_of(p.get(spec.band_key)),
            _number(p.get("magzpsci")),
        )
        limit = _number(p.get("diffmaglim"))
        if p.get("procstatus") not in (0, "0") or jd is None or band is None or zp is None:
            continue
        if limit is None or limit <= 0:
            continue
        flux, unc = _number(p.get("forcediffimflux")), _number(p.get("forcediffimfluxunc"))
        if flux is None or unc is None or unc <= 0:
            point_flux, fluxerr = None, 10 ** (-0.4 * (limit - zp)) / 5
        else:
            point_flux, fluxerr = (flux if flux / unc > SNR_DETECTED else None), unc
        key = (jd, band, point_flux)
        if key in seen:
            continue
        seen.add(key)
        out.append(_point(p, jd, point_flux, fluxerr, zp, band, FORCED_ORIGIN, None, None))
    return out


def _point(
    source: Doc,
    jd: float,
    flux: float | None,
    fluxerr: float,
    zp: float,
    band: str,
    origin: str | None,
    ra: float | None,
    dec: float | None,
) -> Doc:
    return {
        "jd": jd,
        "programid": source.get("programid"),
        "mjd": jd - MJD_OFFSET,
        "flux": flux,
        "fluxerr": fluxerr,
        "zp": zp,
        "magsys": "ab",
        "filter": band,
        "ra": ra,
        "dec": dec,
        "origin": origin,
    }


def stream_key(label: str, origin: str | None) -> str:
    """The per-object state key of what was sent to a stream (by label) from an origin."""
    return f"{label}:{origin or 'alert'}"


def split_by_stream(points: Iterable[Doc], spec: SkyPortalSpec) -> dict[str, list[Doc]]:
    """{stream_key: points in jd order}; a point of a programid with no stream is dropped."""
    out: dict[str, list[Doc]] = {}
    for point in points:
        label = spec.stream_of(point.get("programid"))
        if label is None:
            continue
        out.setdefault(stream_key(label, point["origin"]), []).append(point)
    for items in out.values():
        items.sort(key=lambda p: p["jd"])
    return out


def stream_label(key: str) -> str:
    return key.rsplit(":", 1)[0]


COLUMNS = ("mjd", "flux", "fluxerr", "zp", "magsys", "filter", "ra", "dec", "origin")


def photometry_body(obj_id: str, points: list[Doc]) -> Doc:
    """`PUT /api/photometry` body (columns as lists) for the points of one stream and origin;
    `instrument_id` and `stream_ids` are filled in at delivery (`with_ids`)."""
    body: Doc = {"obj_id": obj_id}
    for column in COLUMNS:
        body[column] = [p[column] for p in points]
    return body


def photometry_params(key: str) -> dict[str, str]:
    """Forced points may revise a flux SkyPortal already has (upstream's query flags)."""
    if key.endswith(f":{FORCED_ORIGIN}"):
        return {"duplicate_ignore_flux": "true", "overwrite_flux": "true"}
    return {}


def with_ids(body: Doc, instrument_id: int, stream_id: int) -> Doc:
    return {**body, "instrument_id": instrument_id, "stream_ids": [stream_id]}
