"""One batch through every stage: decode -> check -> dedup -> ML -> aux (history +
cross-matches) -> alerts -> aliases -> filters -> hand-off -> results (stream records) ->
completed. Data flows forward; each stage is called once per batch. The report carries the
results-stream records of all the batch's alerts back to the consumer, which publishes them with
the batch's offsets (`ingester.results`, `ingester.publisher`).

A packet that cannot be decoded, checked or prepared goes to the `dead_letters` collection with
the reason and its raw bytes; the rest of the batch goes on. Database errors propagate: the
consumer retries the batch (nothing is committed to Kafka before the batch completed).

State is explicit and durable: an alert counts as done (a duplicate if it comes again) only once
the `completed` stage recorded it in the `handoffs` ledger after the hand-off. A batch cut short
anywhere before (process killed, database gone) is redone from the start when Kafka re-delivers
it; every stage tolerates that (see `archive`, `filters`). The hand-off may therefore see an
alert again if the process dies between the hand-off and the ledger write: hand-off stages must
be idempotent per (candid, filter).

Failures that are not retried are counted in the `BatchReport`: filters that failed on an alert
(`filter_failures`), cross-match catalogs that could not be queried (`xmatch_failures`, left
unmatched and matched again later) and model scores that could not be computed (`ml_failures`,
the score is absent).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TypeVar, get_type_hints

from bson import Binary
from pymongo.asynchronous.database import AsyncDatabase

from ingester import aliases, archive, filters, ledger, ml, shapes, xmatch
from ingester.decode import MAGIC, decode_for, writer_schema
from ingester.mongify import Parts
from ingester.registry_client import registry_for_survey
from ingester.results import ResultMessage, pending, record_passes
from kowalski.config import Config
from kowalski.coords import coordinates_problem
from kowalski.documents import Doc, utcnow
from kowalski.surveys import Survey

log = logging.getLogger("kowalski.ingester")
FILTER_RELOAD_SECONDS = 300.0
# hand-off point to the SkyPortal stage: (survey, alert documents, passed filters per candid)
Handoff = Callable[[Survey, list[Doc], dict[int, list[Doc]]], Awaitable[None]]


@dataclass(frozen=True)
class Packet:
    topic: str
    partition: int
    offset: int
    value: bytes
    timestamp_ms: int = 0  # the Kafka message's timestamp (0: none), for the latency metric


@dataclass
class BatchReport:
    received: int = 0
    alerts: int = 0
    duplicates: int = 0
    stored: int = 0
    dead_letters: int = 0
    new_objects: int = 0
    updated_objects: int = 0
    passed: int = 0
    filter_failures: int = 0
    filter_retries: int = 0
    xmatch_failures: int = 0
    ml_failures: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # per filter_id: (filter, alert) passes and failures
    passes_by_filter: dict[int, int] = field(default_factory=dict)
    failures_by_filter: dict[int, int] = field(default_factory=dict)
    # database commands (round trips) the batch sent, by command name
    commands: dict[str, int] = field(default_factory=dict)
    # wall-clock time (epoch seconds) each point was reached: "archived", "filtered"
    marks: dict[str, float] = field(default_factory=dict)
    # results stream: the outbox records of the batch's alerts, published by the consumer
    messages: list[ResultMessage] = field(default_factory=list)

    def add(self, other: BatchReport) -> None:
        kind: type = type(self)  # a class is hashable (the dataclass's instances are not)
        for name in _counters(kind):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        _add_into(self.seconds, other.seconds)
        _add_into(self.passes_by_filter, other.passes_by_filter)
        _add_into(self.failures_by_filter, other.failures_by_filter)
        _add_into(self.commands, other.commands)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time spent inside the block to `seconds[stage]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed


Key = TypeVar("Key")
Amount = TypeVar("Amount", int, float)


def _add_into(mine: dict[Key, Amount], theirs: dict[Key, Amount]) -> None:
    """Add `theirs`' amounts to `mine`, key by key."""
    for key, amount in theirs.items():
        mine[key] = mine[key] + amount if key in mine else amount


@functools.cache
def _counters(report: type[BatchReport]) -> tuple[str, ...]:
    """The report's count fields (resolved types, whether annotations are strings or not)."""
    hints = get_type_hints(report)
    return tuple(item.name for item in fields(report) if hints[item.name] is int)


async def no_handoff(survey: Survey, alerts: list[Doc], passed: dict[int, list[Doc]]) -> None:
    """Default hand-off: posting to SkyPortal is the `skyportal` stage's job (not enabled)."""


def schema_family(packet: bytes) -> str:
    """The first part of the writer schema's full name (`ztf` of `ztf.alert`)."""
    schema = writer_schema(packet)
    name = str(schema.get("name", ""))
    full = name if "." in name else f"{schema.get('namespace') or ''}.{name}"
    return full.split(".")[0]


def check_packet(survey: Survey, packet: bytes) -> str | None:
    """Why a decodable packet is not an alert of `survey` (another stream's schema), or None.
    A Confluent-framed packet has no embedded schema: its schema id chose the schema."""
    if packet[:4] != MAGIC:
        return None
    # writer schemas are named by the survey's family (ztf.alert, winter.alert, lsst.v7_1.alert)
    family = schema_family(packet)
    if family != survey.schema_family:
        return f"check: schema {family!r} is not a {survey.name} alert schema"
    return None


def check_record(survey: Survey, record: Doc) -> str | None:
    """Why a decoded alert cannot be archived (would poison the batch), or None. Surveys whose
    records are not ZTF-like (LSST) have their own check (ingester/shapes.py)."""
    own = shapes.record_check(survey)
    if own is not None:
        return own(record)
    if not isinstance(record.get("candid"), int):
        return "check: no integer candid"
    if not record.get(survey.object_key):
        return f"check: no {survey.object_key}"
    candidate = record.get("candidate") or {}
    problem = coordinates_problem(candidate.get("ra"), candidate.get("dec"))
    if problem:
        return f"check: {problem}"
    missing = sorted(k for k, v in record.items() if k.lower().startswith("cutout") and v is None)
    if missing:
        return f"check: missing cutouts {missing}"
    return None


@dataclass
class Pipeline:
    """Per-worker state: database, loaded models, cached filter templates."""

    cfg: Config
    db: AsyncDatabase[Doc]
    models: dict[str, list[ml.Model]]
    handoff: Handoff = no_handoff
    _filters: dict[str, tuple[float, list[filters.FilterTemplate]]] = field(default_factory=dict)

    async def templates(self, catalog: str) -> list[filters.FilterTemplate]:
        loaded_at, cached = self._filters.get(catalog, (0.0, []))
        if time.monotonic() - loaded_at > FILTER_RELOAD_SECONDS:
            cached = await filters.active_filters(self.db, self.cfg, catalog)
            self._filters[catalog] = (time.monotonic(), cached)
        return cached

    async def dead_letter(self, packet: Packet, error: str) -> None:
        """Keep a packet that cannot be archived, once (a batch redone does not add it again)."""
        digest = hashlib.sha1(packet.value).hexdigest()[:16]
        key = f"{packet.topic}:{packet.partition}:{packet.offset}:{digest}"
        letter = {
            "topic": packet.topic,
            "partition": packet.partition,
            "offset": packet.offset,
            "error": error,
            "packet": Binary(packet.value),
            "received_at": utcnow(),
        }
        await self.db[self.cfg.database.collection("dead_letters")].update_one(
            {"_id": key}, {"$setOnInsert": letter}, upsert=True
        )

    async def decode(
        self, survey: Survey, packets: Sequence[Packet], report: BatchReport
    ) -> list[tuple[Packet, Doc]]:
        decoded: list[tuple[Packet, Doc]] = []
        schemas = registry_for_survey(self.cfg, survey)
        for packet in packets:
            records: list[Doc] = []
            try:
                records = decode_for(survey, packet.value, schemas)
                reason = check_packet(survey, packet.value)
            except Exception as exc:
                reason = f"decode: {exc}"
            if reason is None:
                reason = next(filter(None, (check_record(survey, r) for r in records)), None)
            if reason is not None:
                await self.dead_letter(packet, reason)
                report.dead_letters += 1
                continue
            decoded.extend((packet, record) for record in records)
        return decoded

    async def dedup(
        self, survey: Survey, decoded: list[tuple[Packet, Doc]], report: BatchReport
    ) -> dict[int, tuple[Packet, Doc]]:
        """Alerts not completed before, once each (a batch cut short is redone in full). A ledger
        record whose alert is no longer stored (collection dropped, re-seeded) does not count."""
        handoffs = self.db[ledger.handoffs_collection(self.cfg)]
        ids = [shapes.detection_id(survey, r) for _, r in decoded]
        done = await ledger.completed(handoffs, survey, ids)
        if done:
            alerts = self.db[survey.alerts_collection(self.cfg)]
            done &= await archive.existing_candids(alerts, list(done))
        fresh: dict[int, tuple[Packet, Doc]] = {}
        for candid, (packet, record) in zip(ids, decoded, strict=True):
            if candid in done or candid in fresh:
                report.duplicates += 1
            else:
                fresh[candid] = (packet, record)
        return fresh

    async def prepare(
        self, survey: Survey, fresh: dict[int, tuple[Packet, Doc]], report: BatchReport
    ) -> list[Parts]:
        """ML scores, then archive documents (a packet that cannot be split is dead-lettered)."""
        records = [r for _, r in fresh.values()]
        with report.timed("ml"):
            models = self.models.get(survey.name, [])
            scores = ml.score_alerts(models, records, self.cfg.ml.batch_size)
        report.ml_failures += scores.failures
        parts: list[Parts] = []
        with report.timed("mongify"):
            for (packet, record), classes in zip(
                fresh.values(), scores.classifications, strict=True
            ):
                try:
                    part = shapes.split(survey, record)
                except Exception as exc:
                    await self.dead_letter(
                        packet,
                        f"mongify: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
                    )
                    report.dead_letters += 1
                    continue
                part.alert["classifications"] = classes
                parts.append(part)
        return parts

    async def store(self, survey: Survey, parts: list[Parts], report: BatchReport) -> None:
        """History + cross-matches into aux, then the alerts."""
        catalogs = self.cfg.database.xmatch.get(survey.name, {})

        async def matcher(
            positions: list[tuple[float, float]], wanted: list[set[str]]
        ) -> list[dict[str, list[Doc]]]:
            found = await xmatch.cross_match(self.db, catalogs, positions, wanted)
            report.xmatch_failures += len(found.failed)
            return found.matches

        with report.timed("aux"):
            counts = await archive.store_aux(
                self.db[survey.aux_collection(self.cfg)], survey, parts, list(catalogs), matcher
            )
        report.new_objects = counts["new_objects"]
        report.updated_objects = counts["updated_objects"]
        with report.timed("store"):
            alerts = self.db[survey.alerts_collection(self.cfg)]
            report.stored = await archive.insert_alerts(alerts, [p.alert for p in parts])
        with report.timed("aliases"):
            await aliases.link(self.db, self.cfg, survey, [p.alert for p in parts])

    async def filter(
        self, survey: Survey, parts: list[Parts], report: BatchReport
    ) -> dict[int, list[Doc]]:
        with report.timed("filters"):
            templates = await self.templates(survey.alerts_collection(self.cfg))
            if not templates:
                return {}
            results = await filters.run_filters(
                self.db, self.cfg, templates, [p.candid for p in parts]
            )
        report.passed = sum(len(v) for v in results.passed.values())
        report.filter_failures += results.failures
        report.filter_retries += results.retries
        report.passes_by_filter = results.passes_by_filter()
        report.failures_by_filter = dict(results.failures_by_filter)
        return results.passed

    async def complete(
        self, survey: Survey, parts: list[Parts], passed: dict[int, list[Doc]], report: BatchReport
    ) -> None:
        """Hand off, build the results-stream records, then record every alert as done."""
        with report.timed("handoff"):
            await self.handoff(survey, [p.alert for p in parts], passed)
        with report.timed("results"):
            await record_passes(self.db, self.cfg, survey, [p.alert for p in parts], passed)
        with report.timed("handoff"):
            handoffs = self.db[ledger.handoffs_collection(self.cfg)]
            await ledger.record(handoffs, survey, [p.candid for p in parts], passed, utcnow())

    async def process(self, survey: Survey, packets: Sequence[Packet]) -> BatchReport:
        report = BatchReport(received=len(packets))
        with report.timed("decode"):
            decoded = await self.decode(survey, packets, report)
        report.alerts = len(decoded)
        with report.timed("dedup"):
            fresh = await self.dedup(survey, decoded, report)
        if fresh:
            parts = await self.prepare(survey, fresh, report)
            await self.store(survey, parts, report)
            report.marks["archived"] = time.time()
            passed = await self.filter(survey, parts, report)
            report.marks["filtered"] = time.time()
            await self.complete(survey, parts, passed, report)
        with report.timed("results"):  # new or completed before: a re-delivered batch publishes
            candids = [shapes.detection_id(survey, r) for _, r in decoded]
            report.messages = await pending(self.db, self.cfg, survey, candids)
        return report
