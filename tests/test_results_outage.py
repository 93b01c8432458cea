"""A Kafka outage longer than the consumer's `max.poll.interval.ms` while a streaming filter's
batch is being published (issue #20): the ingester keeps polling its consumer while it retries,
so it never leaves its group, and once the broker is back every pass is published once.

The broker is one of this test's own (real Apache Kafka, stopped and started again on the same
ports and data directory), so the session's broker stays up for the other tests."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from distributed import Client
from pymongo import MongoClient
from pymongo.database import Database

from ingester.consumer import Ingester
from ingester.replay import replay
from ingester.results import ResultMessage
from kowalski import results
from kowalski.config import build_config
from kowalski.services.kafka import LocalKafka
from kowalski.testing.filters import filter_document

from .test_ingestion import dask_client  # noqa: F401  (module fixture, reused)
from .test_results import EVERYTHING, passed_by_filter_runs, read_all, results_env, ztf_packets

MAX_POLL_INTERVAL_MS = 10_000  # the smallest the config accepts (the session timeout is 10 s)
OUTAGE_S = 2.5 * MAX_POLL_INTERVAL_MS / 1000


DEADLINE_S = 300.0


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f} s"
        time.sleep(0.5)


def caught_up(kafka: str, group: str, tag: str) -> bool:
    """Whether `group` committed every partition of the test's input topics to its end."""
    reader = Consumer({"bootstrap.servers": kafka, "group.id": group, "enable.auto.commit": False})
    try:
        topics = reader.list_topics(timeout=10).topics
        partitions = [
            TopicPartition(name, number)
            for name, meta in topics.items()
            if name.startswith("ztf_") and name.endswith(f"_{tag}")
            for number in meta.partitions
        ]
        if not partitions:
            return False
        committed = reader.committed(partitions, timeout=10)
        for done in committed:
            _, high = reader.get_watermark_offsets(done, timeout=10)
            if done.error is not None or done.offset < high:
                return False
        return True
    except KafkaException:
        return False  # the broker is away: not yet
    finally:
        reader.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalKafka]:
    kafka = LocalKafka.on_free_ports(tmp_path / "kafka").start()
    try:
        yield kafka
    finally:
        if kafka.process is not None:
            kafka.stop()


class Outage:
    """Kills the broker when the first batch is about to be published and starts it again
    `OUTAGE_S` later, from another thread (the publisher retries meanwhile)."""

    def __init__(self, broker: LocalKafka) -> None:
        self.broker = broker
        self.stopped_at: float | None = None
        self.back_at: float | None = None
        self.restart: threading.Thread | None = None

    def wrap(self, publish: Any) -> Any:
        def publishing(
            messages: Sequence[ResultMessage], offsets: list[TopicPartition], assigned: set[Any]
        ) -> bool:
            if self.stopped_at is None:
                self.kill()
                self.stopped_at = time.monotonic()
                self.restart = threading.Thread(target=self._restart, daemon=True)
                self.restart.start()
            done: bool = publish(messages, offsets, assigned)
            return done

        return publishing

    def kill(self) -> None:
        """The broker dies at once (SIGKILL), as a crashed host's would."""
        process = self.broker.process
        assert process is not None
        process.kill()
        process.wait()
        self.broker.process = None

    def _restart(self) -> None:
        time.sleep(OUTAGE_S)  # the outage itself: a fixed length, nothing waits on it
        self.broker.start()
        self.back_at = time.monotonic()


def test_an_outage_longer_than_max_poll_interval_keeps_the_group_and_loses_nothing(
    test_environ: dict[str, str],
    mongo_uri: str,
    broker: LocalKafka,
    dask_client: Client,  # noqa: F811
) -> None:
    tag = uuid.uuid4().hex[:8]
    kafka = broker.bootstrap_servers
    env = results_env(
        test_environ,
        kafka,
        tag,
        KOWALSKI__ingester__batch_size="8",
        KOWALSKI__kafka__max_poll_interval_ms=str(MAX_POLL_INTERVAL_MS),
    )
    cfg = build_config([], env)
    db: Database[dict[str, Any]] = MongoClient(mongo_uri)[cfg.database.db]
    try:
        db.filters.insert_one(filter_document(1, EVERYTHING, stream=True))
        replay(kafka, ztf_packets(), suffix=f"_{tag}", progress=False)
        ingester = Ingester(cfg, dask_client, kafka, ["ZTF"], group=f"g-{tag}")
        outage = Outage(broker)
        ingester.publisher.publish = outage.wrap(ingester.publisher.publish)  # type: ignore[method-assign]
        stop = threading.Event()
        running = threading.Thread(target=ingester.run, kwargs={"stop": stop}, daemon=True)
        running.start()
        try:
            wait_for(lambda: caught_up(kafka, f"g-{tag}", tag), DEADLINE_S, "offsets committed")
        finally:
            stop.set()
            running.join(timeout=120)
        assert not running.is_alive()
        assert outage.restart is not None
        outage.restart.join(timeout=120)

        # the consumer was polled all along: it never exceeded max.poll.interval.ms (its
        # partitions may still be revoked: heartbeats fail for longer than the session timeout,
        # and the batch in hand is then given up, re-delivered and published after the rejoin)
        assert outage.stopped_at and outage.back_at
        assert outage.back_at - outage.stopped_at >= OUTAGE_S
        assert ingester.publisher.left_group == 0
        # and nothing is lost or doubled: every pass once, read committed
        assert db.ZTF_alerts.count_documents({}) == 38
        final = read_all(kafka, results.topic_for(cfg, 1, "ZTF"))
        expected = passed_by_filter_runs(db, 1)
        assert sorted(p.record["candid"] for p in final) == expected and len(expected) == 38
    finally:
        db.client.close()
