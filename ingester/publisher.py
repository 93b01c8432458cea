"""Publish a batch's results-stream records and commit its input offsets, exactly once.

Runs in the consumer process (the one that owns the Kafka consumer), in batch order, after the
batch's database writes. With `kafka.results.transactions` (default) one Kafka transaction holds
the batch's records *and* its input offsets (`send_offsets_to_transaction`): a crash before the
commit aborts both (the batch is re-delivered and its records, kept in the outbox, produced again),
a crash after it leaves nothing to redo. Consumers of the results topics read with
`isolation.level=read_committed` and see every pass once.

The transactional id is `<base>-<slot>` (base: `kafka.results.transactional_id`, default
`kowalski-results-<group>-<hostname>`). The slot is the lowest number whose lock file
(`<tmp>/kowalski-transactional-ids/<base>-<slot>.lock`) this publisher can lock (`flock`, held
while the publisher lives, released by the kernel when its process dies): ingester processes
alive on one host never share an id, so they never fence each other, while a restarted process
reclaims a slot of a dead one. The producer is initialised when the ingester starts, before it
consumes: a restarted ingester thereby fences that dead predecessor and aborts its open
transaction at once (otherwise the group's offsets stay pending, and consumption blocked, until
the transaction times out). Zombies of another host are fenced by the consumer group's
generation (KIP-447: the offsets are sent with `consumer_group_metadata()`). Where the broker has no transactions (or
they are switched off) the records are produced by an idempotent producer, flushed, and only then
are the offsets committed: at least once, every message carrying the header
`kowalski-dedup: <candid>:<filter_id>:<fid>` to deduplicate on.

For tests, `KOWALSKI_TEST_CRASH_AT` makes the process SIGKILL itself at one of `CRASH_POINTS`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from ingester.results import ResultMessage, outbox_collection
from kowalski import metrics, results
from kowalski.config import Config
from kowalski.retry import backoff

log = logging.getLogger("kowalski.ingester.publisher")
CRASH_ENV = "KOWALSKI_TEST_CRASH_AT"
CRASH_POINTS = ("before_commit", "between_produce_and_commit", "after_commit")
TIMEOUT_S = 60.0
COMMIT_TIMEOUT_S = TIMEOUT_S  # the wait for commit_transaction's answer (tests shorten it)
# every blocking Kafka call between two polls of the consumer waits at most this share of
# `kafka.max_poll_interval_ms`, so an outage never keeps the consumer unpolled that long
POLL_INTERVAL_SHARE = 0.125  # an attempt makes at most ~6 such calls
MAX_BACKOFF_SECONDS = 60.0
RECENT_KEYS = 100_000  # dedup keys published by this process (a pass in two batches goes once)
SLOT_DIR_ENV = "KOWALSKI_TRANSACTIONAL_ID_DIR"  # where the slot lock files live (default: tmp)


def crash_point(name: str) -> None:
    """Test hook: die here (SIGKILL, no cleanup) when KOWALSKI_TEST_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("%s=%s: killing the ingester now", CRASH_ENV, name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def left_group(error: KafkaError) -> int:
    """1 (and a logged error) when a consumer error says max.poll.interval.ms was exceeded: the
    consumer left its group, its partitions went elsewhere; else 0."""
    if error.code() != KafkaError._MAX_POLL_EXCEEDED:
        return 0
    log.error("kafka: %s (the consumer left its group and rejoins)", error)
    metrics.LEFT_GROUP.inc()
    return 1


def transactional_id_base(cfg: Config, group: str) -> str:
    return cfg.kafka.results.transactional_id or f"kowalski-results-{group}-{socket.gethostname()}"


def slot_dir() -> Path:
    return Path(
        os.environ.get(SLOT_DIR_ENV) or Path(tempfile.gettempdir()) / "kowalski-transactional-ids"
    )


class Slot:
    """The lowest slot number of `base` not locked by a live publisher on this host (any
    process): its lock file stays locked (`flock`, per open file) until `release` or death."""

    def __init__(self, base: str, directory: Path | None = None) -> None:
        folder = directory or slot_dir()
        folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
        number = 0
        while True:
            fd = os.open(folder / f"{safe}-{number}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                number += 1
                continue
            self.number, self._fd = number, fd
            return

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor of the open file unlocks it
            self._fd = -1


class Publisher:
    """Produces results with the batch's offsets; created by the `Ingester`, used from `settle`."""

    def __init__(self, cfg: Config, bootstrap: str, consumer: Consumer, group: str) -> None:
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.consumer = consumer
        base = transactional_id_base(cfg, group)
        self._slot = Slot(base)
        self.txn_id = f"{base}-{self._slot.number}"
        self.producer: Producer | None = None
        self.transactional = cfg.kafka.results.transactions
        self.topics: set[str] = set()
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.published = 0
        self.outbox_left = 0  # records of committed batches that could not be deleted
        self.waiting = False  # in `serve`, serving the consumer between attempts
        # the longest a blocking call may wait (see POLL_INTERVAL_SHARE)
        self.step_s = min(TIMEOUT_S, cfg.kafka.max_poll_interval_ms / 1000 * POLL_INTERVAL_SHARE)
        self.left_group = 0  # max.poll.interval.ms exceeded (the consumer left its group)
        self.commit_retries = 0  # commit_transaction calls retried (a retriable error, a timeout)
        self._mongo: Any = None

    # ------------------------------------------------------------------ producer

    def start(self) -> None:
        """Before consuming: fence a crashed predecessor (aborting its open transaction)."""
        if self.cfg.kafka.results.enabled and self.transactional:
            self._producer()

    def _config(self, transactional: bool) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "enable.idempotence": True,
            "compression.type": self.cfg.kafka.results.compression,
            "linger.ms": 5,
            "message.max.bytes": 10_485_760,
        }
        if transactional:
            conf["transactional.id"] = self.txn_id
        return conf

    def _producer(self) -> Producer:
        if self.producer is None:
            transactional = self._transactional_producer() if self.transactional else None
            self.transactional = transactional is not None
            self.producer = transactional or Producer(self._config(False))
        return self.producer

    def _transactional_producer(self) -> Producer | None:
        """A producer with transactions initialised (fencing any older one with our id), or
        None where the broker refuses transactions. Retriable errors are waited out, serving
        the consumer meanwhile."""
        producer = Producer(self._config(True))
        attempt = 0
        while True:
            attempt += 1
            try:
                producer.init_transactions(self.step_s)
                log.info("results: transactional producer %s ready", self.txn_id)
                return producer
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable():
                    log.warning(
                        "results: no Kafka transactions (%s): falling back to at least once, "
                        "deduplicate on the %s header",
                        error,
                        results.DEDUP_HEADER,
                    )
                    return None
                delay = backoff(attempt, 2.0, MAX_BACKOFF_SECONDS)
                log.warning("results: init_transactions: %s; retry in %.0f s", error, delay)
                self.serve(delay)

    def _ensure_topics(self, messages: Sequence[ResultMessage]) -> None:
        new = sorted({m.topic for m in messages} - self.topics)
        if not new:
            return
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        created = admin.create_topics([NewTopic(t) for t in new], request_timeout=self.step_s)
        for topic, future in created.items():
            try:
                future.result(self.step_s)
            except TimeoutError:
                raise KafkaException(
                    KafkaError(KafkaError._TIMED_OUT, f"creating topic {topic} timed out")
                ) from None
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            self.topics.add(topic)

    def _produce(self, producer: Producer, messages: Sequence[ResultMessage]) -> None:
        """Produce and wait until every message is acknowledged; raise on any delivery error."""
        failures: list[KafkaError] = []

        def delivered(error: KafkaError | None, _msg: Any) -> None:
            if error is not None:
                failures.append(error)

        for message in messages:
            headers: list[tuple[str, str | bytes | None]] = [
                (results.DEDUP_HEADER, message.dedup.encode()),
                (results.SCHEMA_HEADER, results.schema_name().encode()),
            ]
            while True:
                try:
                    producer.produce(
                        message.topic,
                        message.value,
                        message.key,
                        headers=headers,
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.5)
        remaining = producer.flush(self.step_s)
        if failures:
            raise KafkaException(failures[0])
        if remaining:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "results not delivered"))

    # ------------------------------------------------------------------ one batch

    def publish(
        self, messages: Sequence[ResultMessage], offsets: list[TopicPartition], assigned: set[Any]
    ) -> bool:
        """Produce `messages` and commit `offsets` together; retried until done or the batch's
        partitions are no longer ours (then it is re-delivered to their new owner). True when
        committed."""
        fresh = [m for m in messages if m.dedup not in self.recent]
        crash_point("before_commit")
        attempt = 0
        while True:
            attempt += 1
            try:
                self._ensure_topics(fresh)
                producer = self._producer()  # a new one has completed or aborted the old's
                if attempt > 1 and self.transactional and self._committed(offsets):
                    log.warning("results: the batch was committed by an attempt with no answer")
                    break
                if self.transactional:
                    self._transaction(producer, fresh, offsets)
                else:
                    self._at_least_once(producer, fresh, offsets)
                break
            except KafkaException as exc:
                error = exc.args[0]
                if not {(o.topic, o.partition) for o in offsets} <= assigned:
                    log.warning("results: batch given up after a rebalance: %s", error)
                    return False
                delay = backoff(attempt, 1.0, MAX_BACKOFF_SECONDS)
                log.error(
                    "results: publishing %d record(s) failed (attempt %d): %s; retry in %.1f s",
                    len(fresh),
                    attempt,
                    error,
                    delay,
                )
                if error.fatal():
                    self.producer = None
                self.serve(delay)
        crash_point("after_commit")
        metrics.RESULTS_TRANSACTIONS.labels("committed").inc()
        self._remember(fresh)
        self._forget_outbox(messages)
        return True

    def _transaction(
        self, producer: Producer, messages: Sequence[ResultMessage], offsets: list[TopicPartition]
    ) -> None:
        producer.begin_transaction()
        try:
            self._produce(producer, messages)
            producer.send_offsets_to_transaction(
                offsets, self.consumer.consumer_group_metadata(), self.step_s
            )
            crash_point("between_produce_and_commit")
        except KafkaException as exc:
            self._abandon(producer, exc.args[0])
            raise
        self._commit(producer)

    def _commit(self, producer: Producer) -> None:
        """Commit the transaction. A retriable error (an answer that timed out among them) retries
        the commit itself, which returns success where the broker did commit, so a committed batch
        is never produced again; an abortable one aborts (the batch is produced again); a fatal
        one drops the producer (see `_abandon`)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                producer.commit_transaction(min(COMMIT_TIMEOUT_S, self.step_s))
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal() or error.txn_requires_abort() or not error.retriable():
                    self._abandon(producer, error)
                    raise
                self.commit_retries += 1
                delay = backoff(attempt, 0.2, MAX_BACKOFF_SECONDS)
                log.warning(
                    "results: commit_transaction: %s; retrying the commit in %.1f s", error, delay
                )
                self.serve(delay)

    def _abandon(self, producer: Producer, error: KafkaError) -> None:
        """After a failed transaction: abort it where it can be (the batch is then produced
        again), else start over with a new producer (same id: `init_transactions` fences the old
        one, and the broker completes or aborts its transaction; `publish` then finds the batch
        committed or produces it again)."""
        if error.fatal() or not self._aborted(producer):
            self.producer = None

    def serve(self, seconds: float) -> None:
        """Wait between attempts while serving the consumer (`poll`), so that an outage longer
        than `max.poll.interval.ms` does not drop the ingester from its group; its partitions are
        paused meanwhile, and a message that still arrives is rewound to (consumed later)."""
        deadline = time.monotonic() + seconds
        paused = self.consumer.assignment()
        self.consumer.pause(paused)
        self.waiting = True  # a rebalance served meanwhile does not drain (see Ingester)
        try:
            while (left := deadline - time.monotonic()) > 0:
                msg = self.consumer.poll(min(1.0, left))
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    self.left_group += left_group(error)
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                assert topic is not None and partition is not None and offset is not None
                where = TopicPartition(topic, partition, offset)
                self.consumer.pause([where])
                self.consumer.seek(where)
                paused.append(where)
        finally:
            self.waiting = False
            # all of them, ours now or not: librdkafka keeps a partition's pause across a
            # revocation, so one revoked meanwhile (a session lost to an outage) and assigned
            # again would never be fetched
            self.consumer.resume(paused)

    def _committed(self, offsets: list[TopicPartition]) -> bool:
        """Whether the group's committed offsets already cover the batch (stable offsets: an open
        transaction is waited for). Unknown (an error) reads as not committed."""
        try:
            committed = self.consumer.committed(offsets, timeout=self.step_s)
        except KafkaException as exc:
            log.warning("results: committed offsets not read: %s", exc.args[0])
            return False
        done = {(c.topic, c.partition): c.offset for c in committed if c.error is None}
        return all(done.get((o.topic, o.partition), -1) >= o.offset for o in offsets)

    def _aborted(self, producer: Producer) -> bool:
        try:
            producer.abort_transaction(self.step_s)
            metrics.RESULTS_TRANSACTIONS.labels("aborted").inc()
            return True
        except KafkaException as exc:
            log.warning("results: abort failed: %s", exc.args[0])
            return False

    def _at_least_once(
        self, producer: Producer, messages: Sequence[ResultMessage], offsets: list[TopicPartition]
    ) -> None:
        self._produce(producer, messages)
        crash_point("between_produce_and_commit")
        self.consumer.commit(offsets=offsets, asynchronous=False)

    def _remember(self, messages: Sequence[ResultMessage]) -> None:
        for message in messages:
            self.recent[message.dedup] = None
        while len(self.recent) > RECENT_KEYS:
            self.recent.popitem(last=False)
        self.published += len(messages)

    def _forget_outbox(self, messages: Sequence[ResultMessage]) -> None:
        """Delete the committed records from the outbox (a failure only leaves them behind)."""
        from pymongo.errors import PyMongoError

        from kowalski.db import sync_client

        try:
            if self._mongo is None:
                self._mongo = sync_client(self.cfg)
            coll = self._mongo[self.cfg.database.db][outbox_collection(self.cfg)]
            coll.delete_many({"_id": {"$in": [m.outbox_id for m in messages]}})
        except PyMongoError as exc:
            self.outbox_left += len(messages)
            log.warning("results: %d outbox record(s) left behind: %s", len(messages), exc)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush(TIMEOUT_S)
            self.producer.close()
            self.producer = None
        self._slot.release()  # after the producer: a successor never runs beside it
        if self._mongo is not None:
            self._mongo.close()
            self._mongo = None
