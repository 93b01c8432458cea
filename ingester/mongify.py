"""Stage: turn decoded alerts into archive documents (alert + the parts of per-object history).

As upstream: `coordinates` (radec_str, radec_geojson [ra-180, dec], galactic l/b, ecliptic; plus
the sky `cell`, see kowalski/skycells.py),
`classifications`, `prv_candidates` and `fp_hists` moved out of the alert into the aux document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kowalski.coords import coordinates_block
from kowalski.skycells import CELL_KEY, sky_cell
from kowalski.surveys import Survey

MISSING = -99999
MAG_CONST = 1.0857362047581294  # 2.5 / ln(10)


@dataclass
class Parts:
    """One decoded alert split into what goes where."""

    alert: dict[str, Any]  # ZTF_alerts document (cutouts kept, history removed)
    prv_candidates: list[dict[str, Any]]  # history carried by the packet + this detection
    fp_hists: list[dict[str, Any]] = field(default_factory=list)
    # aux fields that the object's most recent alert sets (LSST: the latest diaObject)
    latest: dict[str, Any] = field(default_factory=dict)

    @property
    def candid(self) -> int:
        return int(self.alert["candid"])


def clean(point: dict[str, Any], drop_missing: bool = False) -> dict[str, Any]:
    """Drop None-valued keys (and -99999 / NaN ones for forced photometry)."""
    out = {}
    for key, value in point.items():
        if value is None:
            continue
        if drop_missing and (value == MISSING or (isinstance(value, float) and math.isnan(value))):
            continue
        out[key] = value
    return out


def format_fp_hists(alert: dict[str, Any], fp_hists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Forced photometry as upstream stores it: cleaned, sorted by jd, one per jd, with mag,
    magerr, snr, limmag3sig/5sig and the alert's own mag/ra/dec."""
    candidate = alert["candidate"]
    seen: set[float] = set()
    out = []
    for raw in sorted(fp_hists, key=lambda p: p.get("jd") or 0.0):
        point = clean(raw, drop_missing=True)
        jd = point.get("jd")
        if jd is None or jd in seen:
            continue
        seen.add(jd)
        flux, unc, zp = (
            point.get("forcediffimflux"),
            point.get("forcediffimfluxunc"),
            point.get("magzpsci"),
        )
        if flux is not None and unc is not None and zp is not None and unc > 0:
            snr = flux / unc
            point["snr"] = snr
            point["limmag3sig"] = -2.5 * math.log10(3 * unc) + zp
            point["limmag5sig"] = -2.5 * math.log10(5 * unc) + zp
            if flux > 0:
                point["mag"] = -2.5 * math.log10(flux) + zp
                point["magerr"] = MAG_CONST * unc / flux
        point["alert_mag"] = candidate.get("magpsf")
        point["alert_ra"] = candidate.get("ra")
        point["alert_dec"] = candidate.get("dec")
        out.append(point)
    return out


def split_alert(survey: Survey, decoded: dict[str, Any]) -> Parts:
    alert = dict(decoded)
    candidate = alert["candidate"]
    alert["classifications"] = {}
    alert["coordinates"] = coordinates_block(candidate["ra"], candidate["dec"])
    alert["coordinates"][CELL_KEY] = sky_cell(candidate["ra"], candidate["dec"])
    prv = [clean(p) for p in (alert.pop("prv_candidates", None) or [])]
    # the current detection belongs to the object's history too (upstream left it out)
    prv.append(clean(candidate))
    fp_raw = alert.pop("fp_hists", None) or []
    fp = format_fp_hists(alert, fp_raw) if survey.fp_hists else []
    return Parts(alert=alert, prv_candidates=prv, fp_hists=fp)


def keep_fp_hists_for_new_object(candidate: dict[str, Any]) -> bool:
    """Upstream stores forced photometry for a new object only if it is young."""
    ndethist = candidate.get("ndethist") or 0
    start = candidate.get("jdstarthist")
    return ndethist <= 1 or (start is not None and candidate["jd"] - start < 30)


ZTF_HISTORY_KEY = ("jd", "fid", "candid")


def history_key(
    point: dict[str, Any], fields: tuple[str, ...] = ZTF_HISTORY_KEY
) -> tuple[Any, ...]:
    """Identity of a history point (the survey's `history_key` fields); ZTF non-detections have
    no candid, so jd + fid decide; LSST points are identified by their diaSourceId."""
    return tuple(point.get(name) for name in fields)


def merge_prv_candidates(
    stored: list[dict[str, Any]],
    new: list[dict[str, Any]],
    fields: tuple[str, ...] = ZTF_HISTORY_KEY,
) -> list[dict[str, Any]]:
    """Union keyed by `fields`, sorted by jd: idempotent. A point keeps the values it was first
    stored with (an alert's own candidate, at full precision, before the rounded copies later
    alerts carry in prv_candidates); fields it lacks are added from the later copies."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for point in [*stored, *new]:
        key = history_key(point, fields)
        merged[key] = {**point, **merged[key]} if key in merged else point
    return sorted(merged.values(), key=history_order)


def history_order(point: dict[str, Any]) -> tuple[float, int]:
    """Sort key of prv_candidates; the same order as HISTORY_SORT on the server."""
    return (point.get("jd") or 0.0, point.get("fid") or 0)


HISTORY_SORT = {"jd": 1, "fid": 1}  # `$push ... $sort` of prv_candidates (history_order)
FP_SORT = {"jd": 1}  # `$push ... $sort` of fp_hists (merge_fp_hists' order)


def merge_fp_hists(stored: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per jd keep one entry (the one with the highest alert_mag wins, as upstream), sorted by
    jd: idempotent and independent of ingestion order."""
    best: dict[float, dict[str, Any]] = {}
    for point in [*stored, *new]:
        jd = point["jd"]
        current = best.get(jd)
        if current is None or (point.get("alert_mag") or -math.inf) > (
            current.get("alert_mag") or -math.inf
        ):
            best[jd] = point
    return [best[jd] for jd in sorted(best)]
