"""The LSST benchmark night (`bench --survey lsst`): Rubin alerts built as the ZTF night is
(bench/nightdata.py), from the REAL Rubin packets in data/lsst_alerts (Confluent-framed, from
BOOM's tests; the `fake_` packets there are pittgoogle's synthetic samples and are not used).

Each copy is a new alert of a new object: new diaSourceId (the candid) and diaObjectId, the object
placed at a random offset from the real packet's position, every time of the copy (`*MjdTai` of the
diaSource, diaObject, prvDiaSources and prvDiaForcedSources) shifted together into an 8-hour
night; the history points get new ids of their own. Cutouts, fluxes and the rest are the real
packet's; each copy is framed again with the real packet's schema id. The packet of v7.1 carries
forced photometry (prvDiaForcedSources), which goes into the objects' `fp_hists`; preloaded
objects get the earlier night's history, forced photometry included.
Filters: 25 LSST-shaped ones (thresholds on snr, reliability, history and forced-photometry
lengths, rise, cross-matches), the same way as the ZTF night's.
"""

from __future__ import annotations

import copy
import random
from typing import Any

from bench.nightdata import (
    CANDID_BASE,
    FILTER_COUNT,
    HISTORY_AGE_DAYS,
    NIGHT_LENGTH_DAYS,
    Night,
    NightAlert,
    NightObject,
    NightSpec,
    cross_matched,
    plan_objects,
)
from ingester import shapes
from ingester.decode import confluent_schema_id, decode_for, frame_confluent
from ingester.lsst import MJD_TO_JD
from ingester.registry_client import registry_for_survey
from kowalski.config import ROOT, Config
from kowalski.surveys import SURVEYS

Doc = dict[str, Any]
LSST = SURVEYS["LSST"]
PACKETS = sorted(
    p
    for p in (ROOT / "data" / "lsst_alerts").glob("*.confluent.avro")
    if not p.name.startswith("fake_")
)
OBJECT_BASE = 4 * 10**18  # diaObjectIds of the night's objects
POINT_BASE = 5 * 10**18  # ids of their history points (diaSourceId, diaForcedSourceId)
POINTS_PER_OBJECT = 1000
# the parts of a Rubin record whose times and positions move with the copy
SINGLE_PARTS = ("diaSource", "diaObject")
LIST_PARTS = ("prvDiaSources", "prvDiaForcedSources", "prvDiaNondetectionLimits")
HISTORY_IDS = {"prvDiaSources": "diaSourceId", "prvDiaForcedSources": "diaForcedSourceId"}


def real_packets(cfg: Config) -> list[tuple[int, Doc, Any]]:
    """(schema id, decoded record without `schemavsn`, parsed schema) per real Rubin packet."""
    registry = registry_for_survey(cfg, LSST)
    assert registry is not None  # LSST is Confluent-framed
    out = []
    for path in PACKETS:
        packet = path.read_bytes()
        schema_id = confluent_schema_id(packet)
        record = decode_for(LSST, packet, registry)[0]
        record.pop("schemavsn", None)
        out.append((schema_id, record, registry.schema(schema_id)))
    return out


def source_jd(record: Doc) -> float:
    return float(record["diaSource"]["midpointMjdTai"]) + MJD_TO_JD


def _move(part: Doc, shift: float, ra: float, dec: float, object_id: int) -> None:
    for key, value in part.items():
        if key.endswith("MjdTai") and isinstance(value, int | float):
            part[key] = value + shift
    if part.get("ra") is not None:
        part["ra"], part["dec"] = ra, dec
    if part.get("diaObjectId"):
        part["diaObjectId"] = object_id


def lsst_record(
    base: Doc, obj: NightObject, object_id: int, points: int, candid: int, jd: float
) -> Doc:
    """One alert of object `object_id`: the real record with new ids (history points numbered
    from `points`), position and times."""
    record = copy.deepcopy(base)
    for name in SINGLE_PARTS:
        if record.get(name):
            _move(record[name], obj.shift_days, obj.ra, obj.dec, object_id)
    for name in LIST_PARTS:
        for index, point in enumerate(record.get(name) or []):
            _move(point, obj.shift_days, obj.ra, obj.dec, object_id)
            if name in HISTORY_IDS:
                point[HISTORY_IDS[name]] = points + index
    source = record["diaSource"]
    source["diaSourceId"] = candid
    source["midpointMjdTai"] = jd - MJD_TO_JD
    for key in ("alertId", "diaSourceId"):  # the alert's own id (v7: alertId, v9: diaSourceId)
        if key in record:
            record[key] = candid
    return record


def _views(records: list[Doc]) -> list[Doc]:
    """What `plan_objects` reads of a base packet: its position and time as a ZTF candidate."""
    return [
        {
            "candidate": {
                "ra": r["diaSource"]["ra"],
                "dec": r["diaSource"]["dec"],
                "jd": source_jd(r),
            }
        }
        for r in records
    ]


def build_lsst_night(cfg: Config, spec: NightSpec) -> Night:
    """The night's Rubin alerts in time order (deterministic for a given spec)."""
    rng = random.Random(spec.seed)
    bases = real_packets(cfg)
    views = _views([record for _, record, _ in bases])
    objects = plan_objects(spec, views, rng)
    timed: list[tuple[float, int]] = []
    for number, obj in enumerate(objects):
        first = views[obj.base]["candidate"]["jd"] + obj.shift_days
        later = sorted(first + rng.random() * NIGHT_LENGTH_DAYS / 2 for _ in range(obj.alerts - 1))
        timed.extend((jd, number) for jd in [first, *later])
    timed.sort()
    alerts = []
    for index, (jd, number) in enumerate(timed):
        obj = objects[number]
        schema_id, base, schema = bases[obj.base]
        candid = CANDID_BASE + spec.seed * 10**9 + index
        points = POINT_BASE + number * POINTS_PER_OBJECT
        record = lsst_record(base, obj, OBJECT_BASE + number, points, candid, jd)
        topic = LSST.topic({"schemavsn": f"{schema_id // 100}.{schema_id % 100}"})
        packet = frame_confluent(schema_id, record, schema)
        alerts.append(NightAlert(candid, str(OBJECT_BASE + number), jd, topic, packet))
    fields = [(v["candidate"]["ra"], v["candidate"]["dec"]) for v in views]
    return Night(spec, alerts, objects, LSST.name, fields)


def lsst_history(cfg: Config, night_: Night) -> list[Doc]:
    """`LSST_alerts_aux` documents of the preloaded objects: their packet's history (diaSources
    and forced photometry) 30 days older, the diaObject, cross-matched."""
    bases = real_packets(cfg)
    docs, positions = [], []
    for number, obj in enumerate(night_.objects):
        if not obj.preloaded:
            continue
        shift = obj.shift_days - HISTORY_AGE_DAYS
        earlier = NightObject(obj.object_id, obj.base, obj.ra, obj.dec, shift, 1, True)
        base = bases[obj.base][1]
        # the earlier night's points are numbered after every point of this night's copies
        points = POINT_BASE + (len(night_.objects) + number) * POINTS_PER_OBJECT
        candid = points + POINTS_PER_OBJECT - 1
        record = lsst_record(
            base, earlier, OBJECT_BASE + number, points, candid, source_jd(base) + shift
        )
        parts = shapes.split(LSST, record)
        doc: Doc = {
            "_id": OBJECT_BASE + number,
            "_rev": 1,
            "prv_candidates": parts.prv_candidates,
            **parts.latest,
            "latest_jd": parts.alert["candidate"]["jd"],
        }
        if parts.fp_hists:
            doc["fp_hists"] = parts.fp_hists
        docs.append(doc)
        positions.append((obj.ra, obj.dec))
    return cross_matched(cfg, LSST, docs, positions)


def lsst_filter_pipelines(count: int = FILTER_COUNT) -> list[list[Doc]]:
    """Filter pipelines as users would write them for Rubin alerts, thresholds varied."""
    out = []
    for k in range(count):
        t = (0.3, 0.6, 0.9)[(k // 5) % 3]
        shape = k % 5
        if shape == 0:
            match: Doc = {"candidate.snr": {"$gt": 5 + 10 * t}, "candidate.reliability": {"$gt": t}}
            out.append([{"$match": match}, {"$project": {"candid": 1, "objectId": 1}}])
        elif shape == 1:
            out.append(
                [
                    {"$addFields": {"n_det": {"$size": {"$ifNull": ["$prv_candidates", []]}}}},
                    {"$match": {"n_det": {"$gte": 1 + int(3 * t)}}},
                    {"$project": {"candid": 1, "objectId": 1, "annotations.n_det": "$n_det"}},
                ]
            )
        elif shape == 2:
            out.append(
                [
                    {"$addFields": {"n_fp": {"$size": {"$ifNull": ["$fp_hists", []]}}}},
                    {"$match": {"n_fp": {"$gte": 1}, "candidate.isdiffpos": True}},
                    {"$project": {"candid": 1, "objectId": 1, "annotations.n_fp": "$n_fp"}},
                ]
            )
        elif shape == 3:
            rise = {"$subtract": [{"$max": "$prv_candidates.magpsf"}, "$candidate.magpsf"]}
            out.append(
                [
                    {"$addFields": {"rise": rise}},
                    {"$match": {"rise": {"$gt": t / 3}}},
                    {"$project": {"candid": 1, "objectId": 1, "annotations.rise": "$rise"}},
                ]
            )
        else:
            out.append(
                [
                    {
                        "$match": {
                            "candidate.extendedness": {"$lt": t},
                            "cross_matches.Gaia_EDR3": {"$size": 0},
                        }
                    },
                    {
                        "$project": {
                            "candid": 1,
                            "objectId": 1,
                            "annotations.mag": "$candidate.magpsf",
                        }
                    },
                ]
            )
    return out
