"""One batch through every stage: decode -> dedup -> ML -> aux (history + cross-matches) ->
alerts -> filters -> hand-off -> results (stream records, see `ingester.results`). Data flows
forward; each stage is called once per batch. The report carries the batch's results-stream
records back to the consumer, which publishes them with the batch's offsets.

A packet that cannot be decoded or prepared goes to the `dead_letters` collection with the error
and its raw bytes; the rest of the batch goes on. Database errors propagate: the consumer retries
the batch (nothing is committed to Kafka before the batch is stored).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from bson import Binary
from pymongo.asynchronous.database import AsyncDatabase

from ingester import archive, filters, ml, results, xmatch
from ingester.decode import decode_packet
from ingester.mongify import Parts, split_alert
from kowalski.config import Config
from kowalski.surveys import Survey

log = logging.getLogger("kowalski.ingester")
Doc = dict[str, Any]
FILTER_RELOAD_SECONDS = 300.0
# hand-off point to the SkyPortal stage: (survey, alert documents, passed filters per candid)
Handoff = Callable[[Survey, list[Doc], dict[int, list[Doc]]], Awaitable[None]]


@dataclass(frozen=True)
class Packet:
    topic: str
    partition: int
    offset: int
    value: bytes


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
    seconds: dict[str, float] = field(default_factory=dict)
    # results stream: the outbox records of the batch's alerts, published by the consumer
    messages: list[results.ResultMessage] = field(default_factory=list)

    def add(self, other: BatchReport) -> None:
        for item in fields(self):
            if item.type == "int":
                setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))
        for stage, seconds in other.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time spent inside the block to `seconds[stage]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed


async def no_handoff(survey: Survey, alerts: list[Doc], passed: dict[int, list[Doc]]) -> None:
    """Default hand-off: posting to SkyPortal is the `skyportal` stage's job (not enabled)."""


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
        await self.db[self.cfg.database.collections["dead_letters"]].insert_one(
            {
                "topic": packet.topic,
                "partition": packet.partition,
                "offset": packet.offset,
                "error": error,
                "packet": Binary(packet.value),
                "received_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
            }
        )

    async def process(self, survey: Survey, packets: Sequence[Packet]) -> BatchReport:
        report = BatchReport(received=len(packets))
        cfg = self.cfg
        alerts_coll = self.db[survey.alerts_collection(cfg)]

        with report.timed("decode"):
            decoded: list[tuple[Packet, Doc]] = []
            for packet in packets:
                try:
                    decoded.extend((packet, record) for record in decode_packet(packet.value))
                except Exception as exc:
                    await self.dead_letter(packet, f"decode: {exc}")
                    report.dead_letters += 1
        report.alerts = len(decoded)
        candids = [int(r["candid"]) for _, r in decoded]

        with report.timed("dedup"):
            seen = await archive.existing_candids(alerts_coll, [r["candid"] for _, r in decoded])
            fresh: dict[int, tuple[Packet, Doc]] = {}
            for packet, record in decoded:
                if record["candid"] in seen or record["candid"] in fresh:
                    report.duplicates += 1
                else:
                    fresh[record["candid"]] = (packet, record)
        if not fresh:
            return await self.attach_results(survey, candids, report)
        records = [r for _, r in fresh.values()]

        with report.timed("ml"):
            scores = ml.score_batch(self.models.get(survey.name, []), records, cfg.ml.batch_size)

        with report.timed("mongify"):
            parts: list[Parts] = []
            for (packet, record), classifications in zip(fresh.values(), scores, strict=True):
                try:
                    part = split_alert(survey, record)
                except Exception as exc:
                    await self.dead_letter(
                        packet,
                        f"mongify: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
                    )
                    report.dead_letters += 1
                    continue
                part.alert["classifications"] = classifications
                parts.append(part)

        catalogs = cfg.database.xmatch.get(survey.name, {})

        async def matcher(
            positions: list[tuple[float, float]], wanted: list[set[str]]
        ) -> list[dict[str, list[Doc]]]:
            return await xmatch.cross_match(self.db, catalogs, positions, wanted)

        with report.timed("aux"):
            counts = await archive.store_aux(
                self.db[survey.aux_collection(cfg)], survey, parts, list(catalogs), matcher
            )
        report.new_objects, report.updated_objects = (
            counts["new_objects"],
            counts["updated_objects"],
        )

        with report.timed("store"):
            report.stored = await archive.insert_alerts(alerts_coll, [p.alert for p in parts])

        with report.timed("filters"):
            templates = await self.templates(survey.alerts_collection(cfg))
            passed = (
                await filters.run_filters(self.db, cfg, templates, [p.candid for p in parts])
                if templates
                else {}
            )
        report.passed = sum(len(v) for v in passed.values())

        with report.timed("handoff"):
            await self.handoff(survey, [p.alert for p in parts], passed)
        with report.timed("results"):
            await results.record_passes(self.db, cfg, survey, [p.alert for p in parts], passed)
        return await self.attach_results(survey, candids, report)

    async def attach_results(
        self, survey: Survey, candids: list[int], report: BatchReport
    ) -> BatchReport:
        """Attach the results-stream records of every alert of the batch (new or seen before)."""
        with report.timed("results"):
            report.messages = await results.pending(self.db, self.cfg, survey, candids)
        return report
