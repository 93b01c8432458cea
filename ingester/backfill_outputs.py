"""A back-fill's optional outputs, per batch of passes (`outputs` of the job):

- ``results``: each pass published to the filter's results topic, the record the live stream
  publishes (the filter's `stream` options for cutouts and light curve; the data rights of its
  permissions), with the headers `kowalski-dedup` and `kowalski-backfill: <job id>` that mark it
  as a back-fill's. An idempotent producer, acknowledged before the job's checkpoint moves: at
  least once (a batch redone after a crash publishes its passes again, with the same dedup key).
- ``skyportal``: the passes handed to the broker feed's stage exactly as live passes are
  (`ingester/skyportal/stage.py`): queued in the SkyPortal outbox, delivered by the ingester's
  delivery thread; a batch decided again writes the same outbox ids.

A failure (Kafka unavailable, say) raises `OutputError`: the job keeps its checkpoint and is
resumed after its lease, never marked done with passes missing from an output.
"""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from ingester.filters import FilterOutcome, FilterTemplate, pass_entry
from ingester.results import build_record, filter_views
from ingester.skyportal.stage import FeedStage
from kowalski import results
from kowalski.config import Config
from kowalski.documents import Doc, utcnow
from kowalski.surveys import Survey

BACKFILL_HEADER = "kowalski-backfill"
TIMEOUT_S = 30.0


class OutputError(RuntimeError):
    """An output could not take a batch now; the job resumes from its checkpoint later."""


def ensure_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    future = admin.create_topics([NewTopic(topic)], request_timeout=TIMEOUT_S)[topic]
    try:
        future.result(TIMEOUT_S)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


def publish(
    bootstrap: str, topic: str, messages: list[tuple[str, bytes, str]], job_id: str
) -> None:
    """Produce (key, value, dedup) to `topic` and wait until each is acknowledged."""
    ensure_topic(bootstrap, topic)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _msg: Any) -> None:
        if error is not None:
            failures.append(error)

    for key, value, dedup in messages:
        headers: list[tuple[str, str | bytes | None]] = [
            (results.DEDUP_HEADER, dedup.encode()),
            (results.SCHEMA_HEADER, results.schema_name().encode()),
            (BACKFILL_HEADER, job_id.encode()),
        ]
        producer.produce(topic, value, key.encode(), headers=headers, on_delivery=delivered)
    left = producer.flush(TIMEOUT_S)
    if failures or left:
        raise OutputError(
            f"results stream: {failures[0] if failures else f'{left} not acknowledged'}"
        )


async def deliver(
    db: AsyncDatabase[Doc],
    cfg: Config,
    job: Doc,
    survey: Survey,
    flt: FilterTemplate,
    filter_doc: Doc,
    alerts: AsyncCollection[Doc],
    outcome: FilterOutcome,
) -> None:
    """The job's outputs for one batch's passes (nothing when it has none)."""
    outputs = set(job.get("outputs") or ())
    passed = sorted(outcome.passed)
    if not outputs or not passed:
        return
    full = await alerts.find({"candid": {"$in": passed}}).to_list()
    entries = {candid: pass_entry(flt, outcome, candid) for candid in passed}
    if "results" in outputs:
        await publish_passes(db, cfg, job, survey, flt, filter_doc, full, entries)
    if "skyportal" in outputs:
        await FeedStage(cfg, db)(survey, full, {c: [e] for c, e in entries.items()})


async def publish_passes(
    db: AsyncDatabase[Doc],
    cfg: Config,
    job: Doc,
    survey: Survey,
    flt: FilterTemplate,
    filter_doc: Doc,
    full: list[Doc],
    entries: dict[int, Doc],
) -> None:
    permissions = tuple(sorted(flt.permissions))
    views = await filter_views(db, cfg, flt.catalog, {permissions: set(entries)})
    options = results.stream_options(filter_doc.get("stream")) or results.StreamOptions()
    now = utcnow()
    messages = []
    for alert in full:
        candid = int(alert["candid"])
        view = views[permissions].get(candid)
        if view is None:
            raise OutputError(f"alert {candid} passed filter {flt.filter_id} but is not visible")
        entry = {**entries[candid], "catalog": flt.catalog}
        record = build_record(survey, entry, alert, view, options, now)
        dedup = results.dedup_key(candid, flt.filter_id, flt.fid)
        messages.append((record["objectId"], results.encode(record), dedup))
    topic = results.topic_for(cfg, flt.filter_id, survey.name)
    try:
        await asyncio.to_thread(
            publish, cfg.kafka.bootstrap_servers, topic, messages, str(job["_id"])
        )
    except KafkaException as exc:
        raise OutputError(f"results stream: {exc.args[0]}") from None
