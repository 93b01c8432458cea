"""Publish a batch's results-stream records and commit its input offsets, exactly once.

Runs in the consumer process (the one that owns the Kafka consumer), in batch order, after the
batch's database writes. With `kafka.results.transactions` (default) one Kafka transaction holds
the batch's records *and* its input offsets (`send_offsets_to_transaction`): a crash before the
commit aborts both (the batch is re-delivered and its records, kept in the outbox, produced again),
a crash after it leaves nothing to redo. Consumers of the results topics read with
`isolation.level=read_committed` and see every pass once.

The transactional id is stable per ingester instance (`kafka.results.transactional_id`, default
`kowalski-results-<group>-<hostname>-<n>`, n numbering the ingesters alive in one process), and
the producer is initialised when the ingester starts, before it consumes: a restarted ingester
thereby fences its crashed predecessor and aborts its open transaction at once (otherwise the
group's offsets stay pending, and consumption blocked, until the transaction times out). Where the broker has no transactions (or
they are switched off) the records are produced by an idempotent producer, flushed, and only then
are the offsets committed: at least once, every message carrying the header
`kowalski-dedup: <candid>:<filter_id>:<fid>` to deduplicate on.

For tests, `KOWALSKI_TEST_CRASH_AT` makes the process SIGKILL itself at one of `CRASH_POINTS`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from ingester.results import ResultMessage, outbox_collection
from kowalski import results
from kowalski.config import Config

log = logging.getLogger("kowalski.ingester.publisher")
CRASH_ENV = "KOWALSKI_TEST_CRASH_AT"
CRASH_POINTS = ("before_commit", "between_produce_and_commit", "after_commit")
TIMEOUT_S = 60.0
MAX_BACKOFF_SECONDS = 60.0
RECENT_KEYS = 100_000  # dedup keys published by this process (a pass in two batches goes once)
_LIVE: dict[str, set[int]] = {}  # transactional id base -> numbers of the publishers alive
_LIVE_LOCK = threading.Lock()


def crash_point(name: str) -> None:
    """Test hook: die here (SIGKILL, no cleanup) when KOWALSKI_TEST_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("%s=%s: killing the ingester now", CRASH_ENV, name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def transactional_id_base(cfg: Config, group: str) -> str:
    return cfg.kafka.results.transactional_id or f"kowalski-results-{group}-{socket.gethostname()}"


def claim_number(base: str) -> int:
    """The lowest number not held by a live publisher with this id base in this process."""
    with _LIVE_LOCK:
        held = _LIVE.setdefault(base, set())
        number = next(n for n in range(len(held) + 1) if n not in held)
        held.add(number)
        return number


def release_number(base: str, number: int) -> None:
    with _LIVE_LOCK:
        _LIVE.get(base, set()).discard(number)


class Publisher:
    """Produces results with the batch's offsets; created by the `Ingester`, used from `settle`."""

    def __init__(self, cfg: Config, bootstrap: str, consumer: Consumer, group: str) -> None:
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.consumer = consumer
        self._base = transactional_id_base(cfg, group)
        self._number = claim_number(self._base)
        self.txn_id = f"{self._base}-{self._number}"
        self.producer: Producer | None = None
        self.transactional = cfg.kafka.results.transactions
        self.topics: set[str] = set()
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.published = 0
        self.outbox_left = 0  # records of committed batches that could not be deleted
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
        None where the broker refuses transactions. Retriable errors are waited out."""
        producer = Producer(self._config(True))
        attempt = 0
        while True:
            attempt += 1
            try:
                producer.init_transactions(TIMEOUT_S)
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
                delay = min(MAX_BACKOFF_SECONDS, 2.0**attempt)
                log.warning("results: init_transactions: %s; retry in %.0f s", error, delay)
                time.sleep(delay)

    def _ensure_topics(self, messages: Sequence[ResultMessage]) -> None:
        new = sorted({m.topic for m in messages} - self.topics)
        if not new:
            return
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for topic, future in admin.create_topics([NewTopic(t) for t in new]).items():
            try:
                future.result(TIMEOUT_S)
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
        remaining = producer.flush(TIMEOUT_S)
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
                producer = self._producer()
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
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2**attempt)
                log.error(
                    "results: publishing %d record(s) failed (attempt %d): %s; retry in %.1f s",
                    len(fresh),
                    attempt,
                    error,
                    delay,
                )
                if error.fatal():
                    self.producer = None
                time.sleep(delay)
        crash_point("after_commit")
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
                offsets, self.consumer.consumer_group_metadata(), TIMEOUT_S
            )
            crash_point("between_produce_and_commit")
            producer.commit_transaction(TIMEOUT_S)
        except KafkaException as exc:
            if exc.args[0].fatal() or not self._aborted(producer):
                self.producer = None  # start over with a new producer (same id: new epoch)
            raise

    def _aborted(self, producer: Producer) -> bool:
        try:
            producer.abort_transaction(TIMEOUT_S)
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
        release_number(self._base, self._number)
        if self.producer is not None:
            self.producer.flush(TIMEOUT_S)
            self.producer.close()
            self.producer = None
        if self._mongo is not None:
            self._mongo.close()
            self._mongo = None
