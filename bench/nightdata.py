"""The benchmark night: alert packets, cross-match catalogs, filters and preloaded history.

- Alerts: copies of the 38 REAL ZTF packets in data/ztf_alerts, re-encoded with their own writer
  schema. Each copy is a new alert of a new object: new candid and objectId, the object placed at a
  random offset (up to `jitter_deg`) from the real packet's position, its detections spread over an
  8-hour night (all jds of the copy, history included, shifted together). Cutouts, photometry and
  the rest are the real packet's. Objects have 1-3 alerts in the night.
- History: a fraction of the objects already have an `_alerts_aux` document from an earlier night
  (their history 30 days older, cross-matched then), as on a real night.
- Catalogs: SYNTHETIC (kowalski/catalogs/synthetic.py), one per configured cross-match catalog of
  the night's survey: uniform background around the night's fields plus a counterpart within 1"
  of half the objects, so cross-matches find something. The background is `catalog_rows` rows,
  except for catalogs searched with wide cones, which get their real sky density
  (`REAL_DENSITY`): 20,000 rows around a few fields would put hundreds of galaxies in each 300"
  CLU cone, where the real CLU has a handful, and every match is stored in the history document
  the filters read back.
- Filters: 25 active filters in the shapes users write (thresholds on drb/magpsf/ML scores,
  `$project` annotations, history and cross-match conditions); the upstream stages (`$lookup` of
  the history, permissions) are prepended by the pipeline as for every filter.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fastavro
import numpy as np
import pandas as pd

from ingester import xmatch
from ingester.decode import decode_packet, writer_schema
from ingester.ledger import handoffs_collection
from ingester.mongify import split_alert
from kowalski.config import ROOT, Config
from kowalski.db import async_client, sync_client
from kowalski.surveys import SURVEYS, Survey
from ops.catalogs.ingest import Columns, frame_chunks, ingest_chunks
from ops.catalogs.synthetic import generate

Doc = dict[str, Any]
ZTF = SURVEYS["ZTF"]
PACKETS = sorted((ROOT / "data" / "ztf_alerts").rglob("*.avro"))
CANDID_BASE = 3 * 10**18
NIGHT_START_JD = 2461374.625  # 2026-12-01 03:00 UTC
NIGHT_LENGTH_DAYS = 8 / 24
HISTORY_AGE_DAYS = 30.0
ALERTS_PER_OBJECT = (1, 2, 3)
ALERTS_PER_OBJECT_WEIGHTS = (0.6, 0.3, 0.1)
FILTER_COUNT = 25
# sources per square degree of the real catalogs searched with wide cones: CLU (Cook et al. 2019)
# holds ~272,000 galaxies over the sky's 41,253 deg²
REAL_DENSITY = {"CLU_20190625": 272_000 / 41_253}


@dataclass(frozen=True)
class NightSpec:
    alerts: int
    catalog_rows: int = 20000
    history_fraction: float = 0.3
    jitter_deg: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class NightAlert:
    candid: int
    object_id: str
    jd: float
    topic: str
    packet: bytes


@dataclass(frozen=True)
class NightObject:
    object_id: str
    base: int  # index into PACKETS
    ra: float
    dec: float
    shift_days: float  # added to every jd of the base packet
    alerts: int
    preloaded: bool


@dataclass
class Night:
    spec: NightSpec
    alerts: list[NightAlert]
    objects: list[NightObject]
    survey: str = ZTF.name
    fields: list[tuple[float, float]] = field(default_factory=list)  # (ra, dec) per base packet

    @property
    def topics(self) -> list[str]:
        return sorted({a.topic for a in self.alerts})


def object_name(number: int) -> str:
    """A ZTF-style name: ZTF + two-digit year + seven letters."""
    letters = []
    for _ in range(7):
        number, digit = divmod(number, 26)
        letters.append(chr(ord("a") + digit))
    return "ZTF26" + "".join(reversed(letters))


def offset_position(
    ra: float, dec: float, radius_deg: float, rng: random.Random
) -> tuple[float, float]:
    """A point uniformly inside a small cap of `radius_deg` around (ra, dec)."""
    r = radius_deg * math.sqrt(rng.random())
    angle = rng.uniform(0, 2 * math.pi)
    new_dec = max(-89.999, min(89.999, dec + r * math.sin(angle)))
    new_ra = (ra + r * math.cos(angle) / max(math.cos(math.radians(new_dec)), 1e-6)) % 360
    return new_ra, new_dec


def _shift_history(record: Doc, shift: float, ra: float, dec: float) -> None:
    for key in ("prv_candidates", "fp_hists"):
        for point in record.get(key) or []:
            point["jd"] += shift
            if point.get("ra") is not None:
                point["ra"], point["dec"] = ra, dec


def night_record(base: Doc, obj: NightObject, candid: int, jd: float) -> Doc:
    """One alert of `obj`: a deep copy of the real record with new ids, position and times."""
    record = copy.deepcopy(base)
    record["objectId"] = obj.object_id
    record["candid"] = candid
    candidate = record["candidate"]
    candidate["candid"] = candid
    for key in ("jdstarthist", "jdendhist", "jdstartref", "jdendref"):
        if candidate.get(key) is not None:
            candidate[key] += obj.shift_days
    candidate["jd"] = jd
    candidate["ra"], candidate["dec"] = obj.ra, obj.dec
    _shift_history(record, obj.shift_days, obj.ra, obj.dec)
    return record


class Encoder:
    """Avro object container per record, with the writer schema of the packet it came from."""

    def __init__(self) -> None:
        self._schemas: dict[str, Any] = {}

    def schema(self, packet: bytes) -> Any:
        text = json.dumps(writer_schema(packet), sort_keys=True)
        if text not in self._schemas:
            self._schemas[text] = fastavro.parse_schema(
                json.loads(text), _ignore_default_error=True
            )
        return self._schemas[text]

    def encode(self, schema: Any, record: Doc) -> bytes:
        buf = io.BytesIO()
        fastavro.writer(buf, schema, [record], codec="null")
        return buf.getvalue()


def plan_objects(spec: NightSpec, bases: list[Doc], rng: random.Random) -> list[NightObject]:
    objects: list[NightObject] = []
    planned = 0
    while planned < spec.alerts:
        count = min(
            rng.choices(ALERTS_PER_OBJECT, ALERTS_PER_OBJECT_WEIGHTS)[0], spec.alerts - planned
        )
        base = len(objects) % len(bases)
        candidate = bases[base]["candidate"]
        ra, dec = offset_position(candidate["ra"], candidate["dec"], spec.jitter_deg, rng)
        first_jd = NIGHT_START_JD + rng.random() * NIGHT_LENGTH_DAYS
        objects.append(
            NightObject(
                object_id=object_name(spec.seed * 10**6 + len(objects)),
                base=base,
                ra=ra,
                dec=dec,
                shift_days=first_jd - candidate["jd"],
                alerts=count,
                preloaded=rng.random() < spec.history_fraction,
            )
        )
        planned += count
    return objects


def build_night(spec: NightSpec) -> Night:
    """The night's alerts in time order (deterministic for a given spec)."""
    rng = random.Random(spec.seed)
    raw = [p.read_bytes() for p in PACKETS]
    bases = [decode_packet(p)[0] for p in raw]
    encoder = Encoder()
    schemas = [encoder.schema(p) for p in raw]
    objects = plan_objects(spec, bases, rng)
    timed: list[tuple[float, NightObject]] = []
    for obj in objects:
        first = bases[obj.base]["candidate"]["jd"] + obj.shift_days
        later = sorted(first + rng.random() * NIGHT_LENGTH_DAYS / 2 for _ in range(obj.alerts - 1))
        timed.extend((jd, obj) for jd in [first, *later])
    timed.sort(key=lambda item: item[0])
    alerts = []
    for number, (jd, obj) in enumerate(timed):
        candid = CANDID_BASE + spec.seed * 10**9 + number
        record = night_record(bases[obj.base], obj, candid, jd)
        topic = ZTF.topic(record)
        packet = encoder.encode(schemas[obj.base], record)
        alerts.append(NightAlert(candid, obj.object_id, jd, topic, packet))
    fields = [(b["candidate"]["ra"], b["candidate"]["dec"]) for b in bases]
    return Night(spec, alerts, objects, ZTF.name, fields)


# --- catalogs ---------------------------------------------------------------------------------


def catalog_frame(night_: Night, index: int, name: str = "") -> pd.DataFrame:
    """SYNTHETIC rows: background around each real field (`REAL_DENSITY` for the catalog `name`
    where it has one) plus counterparts of half the objects."""
    spec, objects = night_.spec, night_.objects
    rng = np.random.default_rng(spec.seed * 1000 + index)
    centers = [night_.fields[b] for b in sorted({o.base for o in objects})]
    counterparts = [o for o in objects if rng.random() < 0.5]
    background_rows = max(spec.catalog_rows - len(counterparts), 0)
    radius = spec.jitter_deg + 0.01
    cap_sqdeg = 2 * math.pi * (1 - math.cos(math.radians(radius))) * (180 / math.pi) ** 2
    density = REAL_DENSITY.get(name, background_rows / max(len(centers), 1) / cap_sqdeg)
    frames = [
        generate(density, center=center, radius_deg=radius, seed=int(rng.integers(1_000_000_000)))
        for center in centers
    ]
    rows = []
    for obj in counterparts:
        sep = rng.uniform(0, 1.0 / 3600)
        angle = rng.uniform(0, 2 * math.pi)
        cos_dec = max(math.cos(math.radians(obj.dec)), 1e-6)
        rows.append(
            {
                "ra": (obj.ra + sep * math.cos(angle) / cos_dec) % 360,
                "dec": obj.dec + sep * math.sin(angle),
                "mag": float(rng.uniform(14, 21)),
                "mag_err": 0.05,
                "synthetic": True,
            }
        )
    frame = pd.concat([*frames, pd.DataFrame(rows)], ignore_index=True)
    frame["id"] = np.arange(1, len(frame) + 1)
    return frame


def load_catalogs(cfg: Config, night_: Night) -> dict[str, int]:
    """One SYNTHETIC catalog per cross-match catalog configured for the night's survey; returns
    rows per catalog."""
    rows: dict[str, int] = {}
    with sync_client(cfg) as client:
        db = client[cfg.database.db]
        for index, catalog in enumerate(cfg.database.xmatch.get(night_.survey, {})):
            db.drop_collection(catalog)
            frame = catalog_frame(night_, index, catalog)
            ingest_chunks(
                db,
                catalog,
                frame_chunks(frame, 5000),
                Columns("ra", "dec", "id", int),
                f"bench-night:{catalog}",
                progress=False,
            )
            rows[catalog] = len(frame)
        db.drop_collection("catalog_ingest_checkpoints")
    return rows


# --- filters ----------------------------------------------------------------------------------


def _filter_shapes(i: int) -> Iterator[list[Doc]]:
    """Filter pipelines as users write them, thresholds varied by `i`."""
    t = (0.3, 0.6, 0.9)[i % 3]
    yield [
        {"$match": {"candidate.drb": {"$gt": t}, "candidate.magpsf": {"$lt": 18.5 + i % 3}}},
        {"$project": {"_id": 0, "candid": 1, "objectId": 1}},
    ]
    yield [
        {"$match": {"classifications.braai": {"$gt": t}, "classifications.acai_n": {"$lt": 0.5}}},
        {"$project": {"candid": 1, "objectId": 1, "annotations.braai": "$classifications.braai"}},
    ]
    yield [
        {
            "$match": {
                "classifications.bts": {"$gt": t / 2},
                "candidate.isdiffpos": {"$in": ["t", "1"]},
            }
        },
        {"$project": {"candid": 1, "objectId": 1, "annotations.bts": "$classifications.bts"}},
    ]
    yield [
        {"$addFields": {"n_det": {"$size": {"$ifNull": ["$prv_candidates", []]}}}},
        {"$match": {"n_det": {"$gte": 2 + 4 * (i % 3)}}},
        {"$project": {"candid": 1, "objectId": 1, "annotations.n_det": "$n_det"}},
    ]
    yield [
        {"$addFields": {"faintest": {"$max": "$prv_candidates.magpsf"}}},
        {"$match": {"$expr": {"$lt": ["$candidate.magpsf", {"$subtract": ["$faintest", t]}]}}},
        {
            "$project": {
                "candid": 1,
                "objectId": 1,
                "annotations.rise": {"$subtract": ["$faintest", "$candidate.magpsf"]},
            }
        },
    ]
    yield [
        {"$match": {"candidate.sgscore1": {"$lt": t}, "cross_matches.Gaia_EDR3": {"$size": 0}}},
        {"$project": {"candid": 1, "objectId": 1}},
    ]
    yield [
        {"$addFields": {"age": {"$subtract": ["$candidate.jd", "$candidate.jdstarthist"]}}},
        {"$match": {"age": {"$lt": 3 + 30 * (i % 3)}, "candidate.ndethist": {"$gte": 1}}},
        {"$project": {"candid": 1, "objectId": 1, "annotations.age": "$age"}},
    ]
    yield [
        {"$match": {"classifications.acai_h": {"$gt": t / 3}}},
        {
            "$project": {
                "_id": 0,
                "candid": 1,
                "objectId": 1,
                "annotations": {
                    "mag": "$candidate.magpsf",
                    "drb": "$candidate.drb",
                    "acai_h": "$classifications.acai_h",
                    "n_gaia": {"$size": {"$ifNull": ["$cross_matches.Gaia_EDR3", []]}},
                },
            }
        },
    ]


def filter_pipelines(count: int = FILTER_COUNT) -> list[list[Doc]]:
    shapes = len(list(_filter_shapes(0)))
    return [list(_filter_shapes(k // shapes))[k % shapes] for k in range(count)]


def load_filters(
    cfg: Config,
    count: int = FILTER_COUNT,
    survey: Survey = ZTF,
    pipelines: list[list[Doc]] | None = None,
) -> int:
    """`count` active filters on the survey's alerts (default: the ZTF shapes above)."""
    with sync_client(cfg) as client:
        coll = client[cfg.database.db][cfg.database.collections["filters"]]
        coll.delete_many({})
        coll.insert_many(
            [
                {
                    "filter_id": k + 1,
                    "group_id": 1 + k % 5,
                    "catalog": survey.alerts_collection(cfg),
                    "permissions": [1, 2, 3],
                    "active": True,
                    "active_fid": f"night{k}",
                    "fv": [{"fid": f"night{k}", "pipeline": json.dumps(pipeline)}],
                    "autosave": k % 4 == 0,
                    "auto_followup": {},
                }
                for k, pipeline in enumerate(pipelines or filter_pipelines(count))
            ]
        )
    return count


# --- per-object history from an earlier night --------------------------------------------------


def history_documents(cfg: Config, night_: Night) -> list[Doc]:
    """`_alerts_aux` documents of the preloaded objects: history 30 days older, cross-matched."""
    bases = [decode_packet(p.read_bytes())[0] for p in PACKETS]
    docs = []
    for obj in night_.objects:
        if not obj.preloaded:
            continue
        earlier = NightObject(
            obj.object_id, obj.base, obj.ra, obj.dec, obj.shift_days - HISTORY_AGE_DAYS, 1, True
        )
        base = bases[obj.base]
        record = night_record(base, earlier, 0, base["candidate"]["jd"] + earlier.shift_days)
        parts = split_alert(ZTF, record)
        docs.append({"_id": obj.object_id, "_rev": 1, "prv_candidates": parts.prv_candidates})
    return cross_matched(cfg, ZTF, docs, [(o.ra, o.dec) for o in night_.objects if o.preloaded])


def cross_matched(
    cfg: Config, survey: Survey, docs: list[Doc], positions: list[tuple[float, float]]
) -> list[Doc]:
    """The aux documents with `cross_matches` at their positions (the survey's catalogs)."""
    catalogs = cfg.database.xmatch.get(survey.name, {})

    async def matches() -> list[dict[str, list[Doc]]]:
        client = async_client(cfg)
        try:
            found = await xmatch.cross_match(client[cfg.database.db], catalogs, positions)
            return found.matches
        finally:
            await client.close()

    for doc, found in zip(docs, asyncio.run(matches()) if docs else [], strict=True):
        doc["cross_matches"] = found
    return docs


def reset_archive(cfg: Config, history: list[Doc], survey: Survey = ZTF) -> None:
    """Empty alerts, history and filter runs; preload the earlier night's history."""
    from kowalski.db import ensure_indexes_sync

    collections = cfg.database.collections
    with sync_client(cfg) as client:
        db = client[cfg.database.db]
        for name in (
            survey.alerts_collection(cfg),
            survey.aux_collection(cfg),
            collections["filter_runs"],
            collections["dead_letters"],
            handoffs_collection(cfg),
        ):
            db.drop_collection(name)
        ensure_indexes_sync(db, cfg, survey.alerts_collection(cfg))
        if history:
            db[survey.aux_collection(cfg)].insert_many(copy.deepcopy(history))
