"""Upstream's way, the night benchmark's honest baseline: what upstream Kowalski's alert worker
(`kowalski/alert_brokers/alert_broker_ztf.py`, `process_alert`) sends to the database for every
alert, built from this project's stages and run through the same Kafka -> dask -> archive path.

Per alert, one at a time (a batch from Kafka is processed alert by alert):
- decode, the duplicate check (the `handoffs` ledger), ML and the document split: this project's
  stages on one alert;
- the history read upstream does before ML: `find_one` of the object's aux `prv_candidates` and
  a `find` of its stored alerts' `candidate`;
- the alert `insert`;
- `count_documents` of the object's aux document; a new object is cross-matched with one cone
  query per catalog and its aux document inserted; a known object gets `update_one` with
  `$addToSet: {prv_candidates: {$each: <the packet's whole history>}}` (upsert), and, when it
  keeps forced photometry and the alert carries some, a `count_documents` of `fp_hists` then its
  merge (a read and a `$set`, where upstream runs two aggregations);
- the alias links (this project's, as in the batched mode);
- every active filter as its own aggregation on this one candid (no `$facet` sharing); each
  filter's pipeline is this project's (its history join trimmed to the fields it reads), so on
  that point this baseline is cheaper than upstream;
- the results-stream records and the `handoffs` ledger record, as in the batched mode.
"""

from __future__ import annotations

from typing import Any

from distributed import get_worker

from ingester import aliases, archive, filters, shapes, xmatch
from ingester.consumer import _RUNTIMES
from ingester.mongify import Parts, keep_fp_hists_for_new_object, merge_fp_hists
from ingester.pipeline import BatchReport, Packet, Pipeline
from ingester.results import pending
from kowalski.surveys import SURVEYS, Survey

Doc = dict[str, Any]


def process_upstream(runtime: str, survey: str, packets: list[Packet]) -> BatchReport:
    """The dask task (`Ingester.task`): the batch's alerts one at a time, upstream's way."""
    loop, pipeline, _ = _RUNTIMES[(get_worker().address, runtime)].pipeline()
    return loop.run_until_complete(process_alerts(pipeline, SURVEYS[survey], packets))


async def process_alerts(pipeline: Pipeline, survey: Survey, packets: list[Packet]) -> BatchReport:
    report = BatchReport()
    for packet in packets:
        one = await process_alert(pipeline, survey, packet)
        report.add(one)
        report.messages.extend(one.messages)
    return report


async def process_alert(pipeline: Pipeline, survey: Survey, packet: Packet) -> BatchReport:
    report = BatchReport(received=1)
    with report.timed("decode"):
        decoded = await pipeline.decode(survey, [packet], report)
    report.alerts = len(decoded)
    with report.timed("dedup"):
        fresh = await pipeline.dedup(survey, decoded, report)
    if fresh:
        parts = await pipeline.prepare(survey, fresh, report)
        for part in parts:
            await store_alert(pipeline, survey, part, report)
            passed = await filter_alert(pipeline, survey, part, report)
            await pipeline.complete(survey, [part], passed, report)
    with report.timed("results"):  # as the batched pipeline: a re-delivered alert publishes
        candids = [shapes.detection_id(survey, r) for _, r in decoded]
        report.messages = await pending(pipeline.db, pipeline.cfg, survey, candids)
    return report


async def store_alert(pipeline: Pipeline, survey: Survey, part: Parts, report: BatchReport) -> None:
    db, cfg = pipeline.db, pipeline.cfg
    alerts = db[survey.alerts_collection(cfg)]
    aux = db[survey.aux_collection(cfg)]
    oid = part.alert[survey.object_key]
    with report.timed("aux"):  # upstream reads the history before its ML stage
        await aux.find_one({"_id": oid}, {"prv_candidates": 1})
        await alerts.find({survey.object_key: oid}, {"candidate": 1}).to_list()
    with report.timed("store"):
        report.stored += await archive.insert_ignoring_duplicates(alerts, [part.alert])
    with report.timed("aux"):
        if await aux.count_documents({"_id": oid}, limit=1) == 0:
            await insert_object(pipeline, survey, part, report)
            report.new_objects += 1
        else:
            await update_object(pipeline, survey, part)
            report.updated_objects += 1
    with report.timed("aliases"):
        await aliases.link(db, cfg, survey, [part.alert])


def latest_fields(part: Parts) -> Doc:
    return {**part.latest, "latest_jd": part.alert["candidate"]["jd"]} if part.latest else {}


async def insert_object(
    pipeline: Pipeline, survey: Survey, part: Parts, report: BatchReport
) -> None:
    """A new object: one cone query per catalog, then its aux document."""
    catalogs = pipeline.cfg.database.xmatch.get(survey.name, {})
    candidate = part.alert["candidate"]
    found = await xmatch.cross_match(
        pipeline.db, catalogs, [(candidate["ra"], candidate["dec"])], [set(catalogs)]
    )
    report.xmatch_failures += len(found.failed)
    doc: Doc = {
        "_id": part.alert[survey.object_key],
        "prv_candidates": part.prv_candidates,
        "cross_matches": found.matches[0] if found.matches else {},
        **latest_fields(part),
    }
    if part.fp_hists and keep_fp_hists_for_new_object(candidate):
        doc["fp_hists"] = part.fp_hists
    aux = pipeline.db[survey.aux_collection(pipeline.cfg)]
    await archive.insert_ignoring_duplicates(aux, [doc])


async def update_object(pipeline: Pipeline, survey: Survey, part: Parts) -> None:
    """A known object: the packet's whole history `$addToSet`, then its forced photometry."""
    aux = pipeline.db[survey.aux_collection(pipeline.cfg)]
    oid = part.alert[survey.object_key]
    change: Doc = {"$addToSet": {"prv_candidates": {"$each": part.prv_candidates}}}
    if part.latest:
        change["$set"] = latest_fields(part)
    await aux.update_one({"_id": oid}, change, upsert=True)
    if not part.fp_hists:
        return
    if await aux.count_documents({"_id": oid, "fp_hists": {"$exists": True}}, limit=1):
        stored = await aux.find_one({"_id": oid}, {"fp_hists": 1}) or {}
        merged = merge_fp_hists(stored.get("fp_hists", []), part.fp_hists)
        await aux.update_one({"_id": oid}, {"$set": {"fp_hists": merged}})


async def filter_alert(
    pipeline: Pipeline, survey: Survey, part: Parts, report: BatchReport
) -> dict[int, list[Doc]]:
    """Every active filter alone on this alert (its own aggregation), runs recorded as always."""
    with report.timed("filters"):
        templates = await pipeline.templates(survey.alerts_collection(pipeline.cfg))
        if not templates:
            return {}
        results = await filters.run_filters(
            pipeline.db, pipeline.cfg, templates, [part.candid], shared=False
        )
    report.passed += sum(len(v) for v in results.passed.values())
    report.filter_failures += results.failures
    report.filter_retries += results.retries
    return results.passed
