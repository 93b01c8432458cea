"""Kafka -> dask.distributed: consume nightly topics by pattern with a stable consumer group, send
batches to the workers, commit offsets only after a batch is stored.

- Pattern subscription picks up new nightly topics without restarts.
- Several batches are in flight (one per worker); offsets are committed in submission order, so
  a commit never passes a batch that is not yet durably stored.
- A failed batch (database down, a dask worker that died, ...) is retried with exponential
  backoff; nothing is dropped.
- Offsets are committed asynchronously (a synchronous commit can block for good while the group
  coordinator is lost); a failed commit is counted and logged, the next one covers it, and a batch
  whose commit never landed is re-delivered after a restart and recognised as done.
- A restart resumes at the committed offsets; re-delivered alerts are harmless: completed ones
  are skipped (the `handoffs` ledger), a batch cut short is redone (see `ingester.pipeline`).
- A batch that returns results-stream records (filters with `stream` on) commits its offsets in
  the Kafka transaction that produces them (`ingester.publisher`): exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from distributed import Client, Future, WorkerPlugin, get_worker, wait

from ingester.archive import prepare_database
from ingester.pipeline import BatchReport, Handoff, Packet, Pipeline, no_handoff
from ingester.publisher import Publisher, left_group
from ingester.results import prepare_outbox
from kowalski import metrics
from kowalski.config import Config
from kowalski.monitoring import CommandCounter
from kowalski.retry import backoff
from kowalski.surveys import SURVEYS, survey_for_topic

log = logging.getLogger("kowalski.ingester")
MAX_BACKOFF_SECONDS = 60.0
_RUNTIMES: dict[tuple[str, str], WorkerRuntime] = {}


class HandoffFactory(Protocol):
    """Picklable: builds a worker's hand-off stage around that worker's database."""

    def __call__(self, db: Any) -> Handoff: ...


def _finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close a loop as `asyncio.run` does: let the tasks still pending on it (the database client's
    background tasks) finish their cancellation first, so none is destroyed while pending."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


class WorkerRuntime:
    """Per dask worker: loaded ML models, and per thread an event loop + database client."""

    def __init__(self, cfg: Config, handoff: HandoffFactory | None = None) -> None:
        from ingester.ml import load_models

        self.cfg = cfg
        self.handoff = handoff
        self.models = {name: load_models(cfg, name) for name in SURVEYS}
        self._local = threading.local()
        self._states: list[tuple[asyncio.AbstractEventLoop, Any]] = []

    def pipeline(self) -> tuple[asyncio.AbstractEventLoop, Pipeline, CommandCounter]:
        """This thread's loop, pipeline and its client's command counter (a thread runs one
        batch at a time, so the counter's commands are the batch's)."""
        state = getattr(self._local, "state", None)
        if state is None:
            from kowalski.db import async_client

            loop = asyncio.new_event_loop()
            commands = CommandCounter(measure_bytes=False)
            client = async_client(self.cfg, event_listeners=[commands])
            db = client[self.cfg.database.db]
            handoff = self.handoff(db) if self.handoff else no_handoff
            state = (loop, Pipeline(self.cfg, db, self.models, handoff=handoff), commands)
            self._local.state = state
            self._states.append((loop, client))
        return state

    def close(self) -> None:
        """Close each thread's client on its own loop, then the loop. Run it in a thread where no
        loop is running (not the dask worker's event loop: `asyncio.to_thread` in `teardown`)."""
        states, self._states = self._states, []
        for loop, client in states:
            if loop.is_closed():
                continue
            if loop.is_running():  # a batch still in flight in its thread: its client stays open
                log.warning("a worker database client is busy at shutdown and is left open")
                continue
            loop.run_until_complete(client.close())
            _finish_loop(loop)

    def run(self, survey: str, packets: list[Packet]) -> BatchReport:
        loop, pipeline, commands = self.pipeline()
        commands.take()  # what a failed earlier batch left is not this batch's
        report = loop.run_until_complete(pipeline.process(SURVEYS[survey], packets))
        report.commands = commands.take()
        return report


class IngesterPlugin(WorkerPlugin):
    """Builds the per-worker runtime once (models loaded once per worker, not per alert).
    Its name identifies the configuration, so ingesters with different settings sharing a
    cluster each get their own runtime."""

    idempotent = True

    def __init__(self, cfg: Config, handoff: HandoffFactory | None = None) -> None:
        self.cfg = cfg
        self.handoff = handoff
        identity = cfg.model_dump_json() + repr(handoff)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.name = f"kowalski-ingester-{digest}"

    def setup(self, worker: Any) -> None:
        _RUNTIMES[(worker.address, self.name)] = WorkerRuntime(self.cfg, self.handoff)

    async def teardown(self, worker: Any) -> None:
        """Called on the worker's event loop, where the runtime's loops cannot run: they are
        closed from a thread of their own."""
        runtime = _RUNTIMES.pop((worker.address, self.name), None)
        if runtime is not None:
            await asyncio.to_thread(runtime.close)


def process_packets(runtime: str, survey: str, packets: list[Packet]) -> BatchReport:
    """The dask task: one batch on this worker, with the runtime of plugin `runtime`."""
    return _RUNTIMES[(get_worker().address, runtime)].run(survey, packets)


@dataclass
class Batch:
    survey: str
    packets: list[Packet]
    future: Future[BatchReport]
    attempts: int = 1

    def offsets(self) -> list[TopicPartition]:
        last: dict[tuple[str, int], int] = {}
        for p in self.packets:
            key = (p.topic, p.partition)
            last[key] = max(last.get(key, -1), p.offset)
        return [TopicPartition(t, part, off + 1) for (t, part), off in last.items()]


@dataclass
class Ingester:
    cfg: Config
    client: Client
    bootstrap_servers: str
    surveys: list[str]
    group: str | None = None
    max_in_flight: int = 2
    handoff: HandoffFactory | None = None  # e.g. the SkyPortal feed (ingester/skyportal/stage.py)
    report: BatchReport = field(default_factory=BatchReport)
    committed: int = 0
    commit_failures: int = 0  # offset commits that failed (their batches may be re-delivered)
    # the dask task run per batch (the benchmark swaps in upstream's per-alert way, bench/upstream.py)
    task: Callable[[str, str, list[Packet]], BatchReport] = process_packets

    def __post_init__(self) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": self.group or self.cfg.kafka.group,
                "enable.auto.commit": False,
                "auto.offset.reset": self.cfg.kafka.auto_offset_reset,
                "session.timeout.ms": 10000,
                "max.poll.interval.ms": self.cfg.kafka.max_poll_interval_ms,
                "fetch.wait.max.ms": 100,
                "topic.metadata.refresh.interval.ms": 5000,
                "fetch.message.max.bytes": 10_485_760,
                "on_commit": self._on_commit,
                # the group's lag per partition reaches the metrics through the statistics
                "statistics.interval.ms": self.cfg.ingester.statistics_interval_ms,
                "stats_cb": metrics.record_kafka_statistics,
            }
        )
        self.patterns = [SURVEYS[s].subscription(self.cfg.kafka.topics) for s in self.surveys]
        self.in_flight: deque[Batch] = deque()
        self.assigned: set[tuple[str, int]] = set()
        self.consumer.subscribe(self.patterns, on_assign=self._on_assign, on_revoke=self._on_revoke)
        prepare_database(self.cfg, self.surveys)
        prepare_outbox(self.cfg)
        self.publisher = Publisher(
            self.cfg, self.bootstrap_servers, self.consumer, self.group or self.cfg.kafka.group
        )
        self.publisher.start()
        plugin = IngesterPlugin(self.cfg, self.handoff)
        self.runtime = plugin.name
        self.client.register_plugin(plugin, name=plugin.name)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish the batches in flight first, except while the publisher waits between
        attempts of the head batch (it then gives up a batch whose partitions went elsewhere)."""
        if not self.publisher.waiting:
            self.drain()
        self.assigned -= {(p.topic, p.partition) for p in partitions}

    def submit(self, survey: str, packets: list[Packet]) -> None:
        future = self.client.submit(self.task, self.runtime, survey, packets, pure=False)
        self.in_flight.append(Batch(survey, packets, future))

    def settle(self, block: bool) -> None:
        """Commit finished batches in order; retry failed ones (the head blocks commits)."""
        while self.in_flight:
            head = self.in_flight[0]
            if not block and not head.future.done():
                return
            try:
                result: BatchReport = self.result(head)
            except Exception as exc:
                delay = backoff(head.attempts, 2.0, MAX_BACKOFF_SECONDS)
                metrics.BATCH_RETRIES.labels(head.survey).inc()
                log.error(
                    "batch of %d %s packets failed (attempt %d): %s; retrying in %.0f s",
                    len(head.packets),
                    head.survey,
                    head.attempts,
                    exc,
                    delay,
                )
                self.publisher.serve(delay)  # the consumer stays in its group meanwhile
                head.future = self.client.submit(
                    self.task, self.runtime, head.survey, head.packets, pure=False
                )
                head.attempts += 1
                continue
            if result.messages:
                if not self.publisher.publish(result.messages, head.offsets(), self.assigned):
                    self.in_flight.popleft()  # re-delivered to the partitions' new owner
                    continue
            else:
                self.commit(head)
            self.committed += len(head.packets)
            self.report.add(result)
            metrics.record_batch(head.survey, result, (p.timestamp_ms for p in head.packets))
            self.in_flight.popleft()
            block = block and len(self.in_flight) >= self.max_in_flight

    def result(self, batch: Batch) -> BatchReport:
        """The batch's report once its task ends, the consumer served meanwhile (a batch slower
        than `max.poll.interval.ms`, e.g. while the database is away, keeps the group)."""
        while not batch.future.done():
            try:
                wait(batch.future, timeout=self.publisher.step_s)
            except TimeoutError:
                self.publisher.serve(0.1)
        report: BatchReport = batch.future.result()
        return report

    def commit(self, batch: Batch) -> None:
        """Commit a completed batch's offsets without waiting for the broker (a synchronous
        commit can block for good while the group coordinator is lost, e.g. across a broker
        restart). A commit that fails is counted and logged (`_on_commit`); the next batch's
        commit covers its partitions, and a batch whose commit never landed is re-delivered after
        a restart and skipped as done (the `handoffs` ledger)."""
        try:
            self.consumer.commit(offsets=batch.offsets(), asynchronous=True)
        except KafkaException as exc:  # not even queued (no coordinator known, ...)
            self.commit_failures += 1
            log.warning("commit not sent (the batch may be re-delivered): %s", exc.args[0])

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's answer to a commit (served while consuming)."""
        failed = [p for p in partitions if p.error is not None]
        if error is None and not failed:
            return
        self.commit_failures += 1
        log.warning(
            "commit failed (the batch may be re-delivered): %s",
            error or "; ".join(f"{p.topic}[{p.partition}]: {p.error}" for p in failed),
        )

    def drain(self) -> None:
        while self.in_flight:
            self.settle(block=True)

    def poll_once(self) -> int:
        messages = self.consumer.consume(
            num_messages=self.cfg.ingester.batch_size, timeout=self.cfg.ingester.batch_timeout_s
        )
        by_survey: dict[str, list[Packet]] = {}
        for msg in messages:
            error = msg.error()
            if error:
                if left_group(error):
                    self.publisher.left_group += 1
                elif error.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka: %s", error)
                continue
            packet = _packet(msg)
            by_survey.setdefault(
                survey_for_topic(packet.topic, self.cfg.kafka.topics).name, []
            ).append(packet)
        for survey, packets in by_survey.items():
            self.submit(survey, packets)
        self.settle(block=len(self.in_flight) >= self.max_in_flight)
        return sum(len(p) for p in by_survey.values())

    def run(
        self,
        stop: threading.Event | None = None,
        until_idle: float | None = None,
        assignment_timeout: float = 90.0,
    ) -> BatchReport:
        """Consume until `stop` is set, or until nothing arrived for `until_idle` seconds after
        partitions were assigned (or `assignment_timeout` passed without any)."""
        started = last_message = time.monotonic()
        try:
            while not (stop and stop.is_set()):
                now = time.monotonic()
                if self.poll_once():
                    last_message = now
                elif until_idle is not None and not self.in_flight:
                    if not self.assigned:
                        last_message = now
                        if now - started > assignment_timeout:
                            break
                    elif now - last_message > until_idle:
                        break
            self.drain()
        finally:
            self.consumer.close()
            self.publisher.close()
            log.info(
                "results: %d record(s) published by %s",
                self.publisher.published,
                self.publisher.txn_id,
            )
        return self.report


def _packet(msg: Message) -> Packet:
    """A consumed message that is not an error (those always carry topic, partition, offset)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    kind, stamp = msg.timestamp()
    return Packet(topic, partition, offset, msg.value() or b"", stamp if kind else 0)


def start_cluster(cfg: Config, processes: bool = True) -> Client:
    """A dask client: the configured scheduler, or a LocalCluster sized from config."""
    if cfg.dask.scheduler_address:
        return Client(cfg.dask.scheduler_address)
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=cfg.dask.n_workers,
        threads_per_worker=cfg.dask.threads_per_worker,
        processes=processes,
        dashboard_address=cfg.dask.dashboard_address if processes else None,
        lifetime=cfg.dask.lifetime if processes else None,
        lifetime_stagger=cfg.dask.lifetime_stagger if processes else None,
        lifetime_restart=cfg.dask.lifetime_restart if processes else False,
        silence_logs=logging.WARNING,
    )
    return Client(cluster)


def close_cluster(client: Client) -> None:
    """Close a client from `start_cluster` and the LocalCluster it started (a client does not
    close a cluster it was handed): the workers' teardown closes their database clients."""
    cluster = client.cluster
    client.close()
    if cluster is not None:
        cluster.close()


def enabled_surveys(cfg: Config) -> list[str]:
    return cfg.enabled_surveys()
