"""Light curves as SkyPortal photometry (upstream `make_photometry` / `alert_put_photometry`).

Alert points (candidate + prv_candidates): µJy fluxes at zp 23.9 AB from magpsf/sigmapsf, signed
by `isdiffpos`; non-detections carry flux None and a 5-sigma fluxerr from diffmaglim; `origin` None.
Forced points (ZTF fp_hists, procstatus 0): flux/fluxerr from forcediffimflux(unc) at zp =
magzpsci, flux None when SNR <= 3 or missing; `origin` "alert_fp". One PUT body per SkyPortal
stream and origin.

Per survey (§4.9): the SkyPortal instrument name, the filter names, and which streams points go
to (ZTF: by programid; the others: the one stream whose name contains the survey's token).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kowalski.surveys import SURVEYS

Doc = dict[str, Any]
ZP_AB = 23.9
MJD_OFFSET = 2400000.5
POSITIVE = (True, 1, "1", "y", "Y", "t", "T")
FORCED_ORIGIN = "alert_fp"
ZTF_STREAMS = {  # SkyPortal stream name -> the ZTF programids it carries (upstream mapping)
    "ZTF Public": (1,),
    "ZTF Public+Partnership": (2,),
    "ZTF Public+Partnership+Caltech": (0, 3),
}
ZTF_PROGRAMIDS = (0, 1, 2, 3)


@dataclass(frozen=True)
class FeedSurvey:
    """What differs between surveys when posting to SkyPortal."""

    instrument: str  # instrument name on SkyPortal
    filter_of: Callable[[Any], str | None]  # fid -> SkyPortal filter name (None: drop the point)
    stream_token: str | None = None  # non-ZTF: a stream whose name contains this token

    def stream_ids(self, streams: Iterable[Doc]) -> dict[int, int]:
        """{programid: stream id} from `GET /api/streams`; programid -1 means "every point"."""
        by_name = {str(s.get("name")): int(s["id"]) for s in streams if "id" in s}
        if self.stream_token is None:
            return {pid: sid for name, sid in by_name.items() for pid in ZTF_STREAMS.get(name, ())}
        token = self.stream_token.lower()
        found = [sid for name, sid in by_name.items() if token in name.lower()]
        return {-1: found[0]} if found else {}

    def required_programids(self) -> tuple[int, ...]:
        return ZTF_PROGRAMIDS if self.stream_token is None else (-1,)


FEED_SURVEYS: dict[str, FeedSurvey] = {
    survey.name: FeedSurvey(
        survey.skyportal.instrument, survey.skyportal.filter_of, survey.skyportal.stream_token
    )
    for survey in SURVEYS.values()
    if survey.skyportal is not None
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)


def alert_points(survey: FeedSurvey, detections: Iterable[Doc]) -> list[Doc]:
    """Candidates and prv_candidates as photometry points (deduplicated on mjd, mag, filter)."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for p in detections:
        jd, band = _number(p.get("jd")), survey.filter_of(p.get("fid"))
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


def forced_points(survey: FeedSurvey, fp_hists: Iterable[Doc]) -> list[Doc]:
    """Stored forced photometry (procstatus 0, diffmaglim > 0) as points of origin alert_fp."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for p in fp_hists:
        jd, band, zp = (
            _number(p.get("jd")),
            survey.filter_of(p.get("fid")),
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
            point_flux, fluxerr = (flux if flux / unc > 3 else None), unc
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


def stream_key(stream_id: int, origin: str | None) -> str:
    """The per-object state key of what was sent to a stream from an origin."""
    return f"{stream_id}:{origin or 'alert'}"


def split_by_stream(points: Iterable[Doc], streams: dict[int, int]) -> dict[str, list[Doc]]:
    """{stream_key: points in jd order}; a point of a programid with no stream is dropped."""
    out: dict[str, list[Doc]] = {}
    for point in points:
        sid = streams.get(-1, streams.get(point.get("programid")))  # type: ignore[arg-type]
        if sid is None:
            continue
        out.setdefault(stream_key(sid, point["origin"]), []).append(point)
    for items in out.values():
        items.sort(key=lambda p: p["jd"])
    return out


COLUMNS = ("mjd", "flux", "fluxerr", "zp", "magsys", "filter", "ra", "dec", "origin")


def photometry_body(obj_id: str, instrument_id: int, key: str, points: list[Doc]) -> Doc:
    """`PUT /api/photometry` body (columns as lists) for the points of one stream and origin."""
    stream_id = int(key.split(":", 1)[0])
    body: Doc = {"obj_id": obj_id, "stream_ids": [stream_id], "instrument_id": instrument_id}
    for column in COLUMNS:
        body[column] = [p[column] for p in points]
    return body


def photometry_params(key: str) -> dict[str, str]:
    """Forced points may revise a flux SkyPortal already has (upstream's query flags)."""
    if key.endswith(f":{FORCED_ORIGIN}"):
        return {"duplicate_ignore_flux": "true", "overwrite_flux": "true"}
    return {}
