"""Documents of Rubin/LSST alerts (and DECam/DESIRT ones), selected by the survey's `shape`.

LSST_alerts: one document per diaSource; `candid` is the diaSourceId (the detection id every
shared stage keys on), `objectId` the diaObjectId (the ssObjectId for a solar-system source
without a diaObject), `candidate` the diaSource with `jd` (from midpointMjdTai) and AB magnitudes
from its nJy fluxes: m = -2.5 log10(|f|) + 31.4, error 2.5/ln(10) * ferr/|f|, `isdiffpos` the sign.
LSST_alerts_aux: prv_candidates (prvDiaSources + each alert's own diaSource, keyed by
diaSourceId), fp_hists (prvDiaForcedSources, with magnitudes), the latest diaObject.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from ingester.mongify import MAG_CONST, Parts, clean
from kowalski.coords import coordinates_block, coordinates_problem
from kowalski.documents import Doc
from kowalski.surveys import Survey

MJD_TO_JD = 2400000.5
ZP_NJY = 31.4  # AB zero point of fluxes in nJy
CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
# per-alert parts of a Rubin packet that belong to the object, not the detection
OBJECT_PARTS = ("diaObject", "ssObject", "MPCORB", "mpc_orbits")


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and math.isfinite(value)


def flux_to_mag(flux: Any, flux_err: Any) -> tuple[float | None, float | None]:
    """AB magnitude (and its error) of an nJy flux; None where the flux is 0 or missing."""
    if not _finite(flux) or flux == 0:
        return None, None
    mag = -2.5 * math.log10(abs(flux)) + ZP_NJY
    err = MAG_CONST * flux_err / abs(flux) if _finite(flux_err) else None
    return mag, err


def photometry(point: Doc) -> Doc:
    """A diaSource / diaForcedSource with jd, magpsf, sigmapsf, isdiffpos and snr added."""
    out = clean(point)
    out["jd"] = point["midpointMjdTai"] + MJD_TO_JD
    flux, err = point.get("psfFlux"), point.get("psfFluxErr")
    mag, magerr = flux_to_mag(flux, err)
    if mag is not None:
        out["magpsf"] = mag
        if magerr is not None:
            out["sigmapsf"] = magerr
    if _finite(flux):
        out["isdiffpos"] = flux > 0
        if _finite(err) and err > 0 and "snr" not in out:
            out["snr"] = flux / err
    return out


def _nonzero(value: Any) -> int | None:
    return int(value) if value else None  # Rubin writes 0 for "no such object" in v7


def object_id(record: Doc) -> int:
    """diaObjectId (diaSource, else diaObject), else ssObjectId (diaSource, ssSource, ssObject)."""
    source = record["diaSource"]
    candidates = (
        source.get("diaObjectId"),
        (record.get("diaObject") or {}).get("diaObjectId"),
        source.get("ssObjectId"),
        (record.get("ssSource") or {}).get("ssObjectId"),
        (record.get("ssObject") or {}).get("ssObjectId"),
    )
    for value in candidates:
        found = _nonzero(value)
        if found is not None:
            return found
    raise ValueError(f"diaSource {source['diaSourceId']} has neither a diaObject nor an ssObject")


def lsst_detection_id(record: Doc) -> int:
    return int(record["diaSource"]["diaSourceId"])


def check_lsst_record(record: Doc) -> str | None:
    """Why a decoded Rubin alert cannot be archived, or None (cutouts are optional: Rubin may
    send none)."""
    source = record.get("diaSource") or {}
    if not isinstance(source.get("diaSourceId"), int):
        return "check: no integer diaSource.diaSourceId"
    if not isinstance(source.get("midpointMjdTai"), int | float):
        return "check: no diaSource.midpointMjdTai"
    try:
        object_id(record)
    except ValueError as exc:
        return f"check: {exc}"
    problem = coordinates_problem(source.get("ra"), source.get("dec"))
    return f"check: {problem}" if problem else None


def split_lsst(survey: Survey, record: Doc) -> Parts:
    candidate = photometry(record["diaSource"])
    alert: Doc = {
        "candid": lsst_detection_id(record),
        "objectId": object_id(record),
        "schemavsn": record.get("schemavsn"),
        "publisher": "LSST",
        "candidate": candidate,
        "coordinates": coordinates_block(candidate["ra"], candidate["dec"]),
        "classifications": {},
    }
    for name in ("alertId", "observation_reason", "target_name", "ssSource"):
        if record.get(name) is not None:
            alert[name] = record[name]
    for name in CUTOUTS:
        alert[name] = record.get(name)
    prv = [photometry(p) for p in record.get("prvDiaSources") or []]
    prv.append(candidate)
    fp = [photometry(p) for p in record.get("prvDiaForcedSources") or []]
    latest = {name: record[name] for name in OBJECT_PARTS if record.get(name) is not None}
    return Parts(alert=alert, prv_candidates=prv, fp_hists=fp, latest=latest)


def decam_point(point: Doc) -> Doc:
    """A DESIRT candidate / forced point with jd (from mjd) and ZTF-style magpsf/sigmapsf."""
    out = clean(point)
    out["jd"] = point["mjd"] + MJD_TO_JD
    if _finite(point.get("forcediffimmag")):
        out["magpsf"] = point["forcediffimmag"]
        if _finite(point.get("forcediffimmagunc")):
            out["sigmapsf"] = point["forcediffimmagunc"]
    return out


def split_decam(survey: Survey, record: Doc) -> Parts:
    alert = {k: v for k, v in record.items() if k not in ("fp_hists", "prv_candidates")}
    candidate = decam_point(record["candidate"])
    alert["candidate"] = candidate
    alert["coordinates"] = coordinates_block(candidate["ra"], candidate["dec"])
    alert["classifications"] = {}
    fp = [decam_point(p) for p in record.get("fp_hists") or []]
    prv = [decam_point(p) for p in record.get("prv_candidates") or []]
    prv.append(candidate)
    return Parts(alert=alert, prv_candidates=prv, fp_hists=fp)
