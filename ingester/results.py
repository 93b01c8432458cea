"""Stage: the results stream's records of a batch (built on the dask worker, published by the
consumer process, see `ingester.publisher`).

After the filters, every pass of a filter whose `stream` option is on becomes one Avro record
(`kowalski.results`), written to the `results_outbox` collection before the batch counts as done.
The first record of a (survey, candid, filter) is kept: a batch that is processed again builds
the same passes and inserts nothing new. Whatever the batch, the worker returns the outbox
records of *all* its alerts, new or already stored, so a batch re-delivered after a crash (its
alerts seen as duplicates, no filter run again) still publishes its passes. The consumer deletes
the records of a batch once its Kafka transaction committed.

What a record holds is what the filter may see: the light curve, forced photometry and
cross-matches come from the filter's own upstream stages (its programid permissions and time
window), the candidate, ML scores and cutouts from the alert itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bson import Binary, json_util
from bson.json_util import RELAXED_JSON_OPTIONS
from pymongo.asynchronous.database import AsyncDatabase

from ingester.archive import insert_ignoring_duplicates
from kowalski import results
from kowalski.config import Config
from kowalski.documents import Doc, utcnow
from kowalski.filtering import full_pipeline
from kowalski.surveys import Survey

log = logging.getLogger("kowalski.ingester.results")
CUTOUTS = ("science", "template", "difference")


@dataclass(frozen=True)
class ResultMessage:
    """One pass, ready to produce: topic, key (objectId), Avro value, dedup key (header)."""

    topic: str
    key: bytes
    value: bytes
    dedup: str
    outbox_id: str


def outbox_collection(cfg: Config) -> str:
    return cfg.database.collection("results_outbox")


def prepare_outbox(cfg: Config) -> None:
    """The outbox index (survey, candid), once, from the consumer process."""
    from kowalski.db import create_index_sync, sync_client

    if not cfg.database.build_indexes:
        return
    with sync_client(cfg) as client:
        coll = client[cfg.database.db][outbox_collection(cfg)]
        create_index_sync(coll, [("survey", 1), ("candid", 1)], "survey_candid")


def scalar(value: Any) -> Any:
    """A value for the schema's scalar union (null, boolean, long, double, string)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item"):  # numpy scalars (ML scores)
        return scalar(value.item())
    return json_util.dumps(value, json_options=RELAXED_JSON_OPTIONS)


def scalars(doc: Doc | None) -> dict[str, Any]:
    return {str(k): scalar(v) for k, v in (doc or {}).items()}


def to_json(value: Any) -> str:
    return json_util.dumps(value, json_options=RELAXED_JSON_OPTIONS, allow_nan=True)


def visible_annotations(survey: Survey, output: Doc) -> Doc:
    hidden = {"_id", "candid", survey.object_key}
    return {k: v for k, v in output.items() if k not in hidden}


def cutouts(survey: Survey, alert: Doc) -> Doc:
    stamps: Doc = {}
    for name in CUTOUTS:
        cutout = alert.get(survey.cutout_field(name)) or {}
        data = cutout.get("stampData") if isinstance(cutout, dict) else None
        stamps[name] = bytes(data) if data is not None else None
    return stamps


def points(values: list[Doc] | None) -> list[dict[str, Any]]:
    ordered = sorted(values or [], key=lambda p: p.get("jd") or -math.inf)
    return [scalars(p) for p in ordered]


def build_record(
    survey: Survey,
    entry: Doc,
    alert: Doc,
    view: Doc,
    options: results.StreamOptions,
    passed_at: dt.datetime,
) -> Doc:
    """The Avro record of one pass (field meanings: schemas/results/filter_pass.avsc)."""
    return {
        "schema_version": results.SCHEMA_VERSION,
        "survey": survey.name,
        "objectId": str(alert[survey.object_key]),
        "candid": int(alert["candid"]),
        "filter_id": int(entry["filter_id"]),
        "fid": str(entry["fid"]),
        "group_id": int(entry["group_id"]),
        "catalog": str(entry.get("catalog") or ""),
        "passed_at": passed_at.replace(tzinfo=dt.UTC),
        "candidate": scalars(alert["candidate"]),
        "classifications": scalars(alert.get("classifications")),
        "annotations": to_json(visible_annotations(survey, entry.get("data") or {})),
        "cross_matches": to_json(view.get("cross_matches") or {}),
        "light_curve": points(view.get("prv_candidates")) if options.lightcurve else None,
        "forced_photometry": (
            points(view.get("fp_hists")) if options.lightcurve and survey.fp_hists else None
        ),
        "cutouts": cutouts(survey, alert) if options.cutouts else None,
    }


async def streaming_filters(
    db: AsyncDatabase[Doc], cfg: Config, filter_ids: set[int]
) -> dict[int, results.StreamOptions]:
    """The stream options of those filters that stream now (read every batch, so switching
    `stream` off takes effect from the next batch)."""
    docs = (
        await db[cfg.database.collection("filters")]
        .find(
            {"filter_id": {"$in": sorted(filter_ids)}, "stream": {"$nin": [False, None]}},
            {"_id": 0, "filter_id": 1, "stream": 1},
        )
        .to_list()
    )
    found = {int(d["filter_id"]): results.stream_options(d.get("stream")) for d in docs}
    return {fid: options for fid, options in found.items() if options is not None}


async def filter_views(
    db: AsyncDatabase[Doc], cfg: Config, catalog: str, wanted: dict[tuple[int, ...], set[int]]
) -> dict[tuple[int, ...], dict[int, Doc]]:
    """{permissions: {candid: the alert as filters with those permissions see it}}: the upstream
    filter stages alone (history and cross-matches within the permissions)."""
    views: dict[tuple[int, ...], dict[int, Doc]] = {}
    for permissions, candids in wanted.items():
        stages = full_pipeline(cfg, catalog, list(permissions), [], sorted(candids))
        docs = await (await db[catalog].aggregate(stages, allowDiskUse=False)).to_list()
        views[permissions] = {int(d["candid"]): d for d in docs}
    return views


def outbox_id(survey: Survey, candid: int, filter_id: int) -> str:
    return f"{survey.name}:{candid}:{filter_id}"


async def record_passes(
    db: AsyncDatabase[Doc],
    cfg: Config,
    survey: Survey,
    alerts: Sequence[Doc],
    passed: dict[int, list[Doc]],
) -> int:
    """Build the records of the batch's streaming passes into the outbox; how many are new."""
    if not cfg.kafka.results.enabled or not passed:
        return 0
    ids = {int(e["filter_id"]) for entries in passed.values() for e in entries}
    streaming = await streaming_filters(db, cfg, ids)
    chosen = [
        (candid, entry, streaming[int(entry["filter_id"])])
        for candid, entries in passed.items()
        for entry in entries
        if int(entry["filter_id"]) in streaming
    ]
    if not chosen:
        return 0
    catalog = survey.alerts_collection(cfg)
    wanted: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for candid, entry, _ in chosen:
        wanted[tuple(sorted(entry.get("permissions", [])))].add(candid)
    views = await filter_views(db, cfg, catalog, wanted)
    by_candid = {int(a["candid"]): a for a in alerts}
    now = utcnow()
    docs = []
    for candid, entry, options in chosen:
        view = views[tuple(sorted(entry.get("permissions", [])))].get(candid)
        if view is None:  # the filter passed it, so its own stages must return it
            raise RuntimeError(
                f"alert {candid} passed filter {entry['filter_id']} but is not visible"
            )
        record = build_record(
            survey, {**entry, "catalog": catalog}, by_candid[candid], view, options, now
        )
        docs.append(
            {
                "_id": outbox_id(survey, candid, int(entry["filter_id"])),
                "survey": survey.name,
                "candid": candid,
                "filter_id": int(entry["filter_id"]),
                "topic": results.topic_for(cfg, int(entry["filter_id"]), survey.name),
                "key": record["objectId"],
                "dedup": results.dedup_key(candid, int(entry["filter_id"]), str(entry["fid"])),
                "value": Binary(results.encode(record)),
                "created_at": now,
            }
        )
    return await insert_ignoring_duplicates(db[outbox_collection(cfg)], docs)


async def pending(
    db: AsyncDatabase[Doc], cfg: Config, survey: Survey, candids: Sequence[int]
) -> list[ResultMessage]:
    """The outbox records of these alerts, in batch order then filter id: what the consumer
    publishes with the batch's offsets."""
    if not cfg.kafka.results.enabled or not candids:
        return []
    docs = (
        await db[outbox_collection(cfg)]
        .find({"survey": survey.name, "candid": {"$in": list(dict.fromkeys(candids))}})
        .to_list()
    )
    order = {candid: i for i, candid in reversed(list(enumerate(candids)))}
    docs.sort(key=lambda d: (order[d["candid"]], d["filter_id"]))
    return [
        ResultMessage(d["topic"], d["key"].encode(), bytes(d["value"]), d["dedup"], d["_id"])
        for d in docs
    ]
