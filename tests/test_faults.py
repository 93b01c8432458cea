"""Faults against the real servers: a killed ingester, a dying dask worker, a broker and a database
that go away mid-stream, poison packets. After each: every alert archived exactly once, histories
complete without duplicates, filter runs and hand-offs (the `handoffs` ledger) neither lost nor
doubled. Waits poll with generous deadlines; nothing asserts on timings.
"""

from __future__ import annotations

import base64
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from distributed import Client
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError

from ingester.consumer import Ingester
from ingester.decode import decode_packet
from ingester.mongify import history_key
from ingester.replay import replay
from kowalski.config import ROOT, build_config
from kowalski.services.dask import local_cluster
from kowalski.services.kafka import LocalKafka, cluster_id
from kowalski.services.mongo import EmbeddedMongo
from kowalski.services.process import free_port
from kowalski.testing.filters import filter_document

from .conftest import OTHER_ALERTS, ZTF_ALERTS, found
from .test_ingestion import FILTER, altered_packet, night_environ

DEADLINE = 600.0  # seconds: generous, the suite must pass on a loaded machine
Doc = dict[str, Any]


def ztf_files(night: str | None = None) -> list[Path]:
    root = ZTF_ALERTS / night if night else ZTF_ALERTS
    return sorted(root.rglob("*.avro"))


def candids_of(paths: list[Path]) -> set[int]:
    return {int(decode_packet(p.read_bytes())[0]["candid"]) for p in paths}


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Poll `condition` (errors count as "not yet") until it holds or `deadline` passes."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if condition():
                return
        except PyMongoError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def add_filter(db: Database[Doc]) -> None:
    db.filters.insert_one(filter_document(1, FILTER, group_id=1))


def ledger_count(db: Database[Doc]) -> int:
    return db.handoffs.count_documents({})


def assert_exactly_once(db: Database[Doc], expected: set[int]) -> None:
    """Alerts, histories, filter runs and the hand-off ledger hold each alert exactly once."""
    alerts = list(db.ZTF_alerts.find({}, {"candid": 1, "objectId": 1}))
    assert Counter(a["candid"] for a in alerts) == Counter(expected)
    ledger = list(db.handoffs.find())
    assert Counter(d["candid"] for d in ledger) == Counter(expected)
    runs = list(db.filter_runs.find({"filter_id": 1}))
    assert all(r["state"] == "ok" for r in runs)
    assert Counter(c for r in runs for c in r["candids"]) == Counter(expected)
    passed = {c for r in runs for c in r["passed"]}
    assert passed and passed <= expected
    assert {d["candid"] for d in ledger if d["filters"]} == passed
    for alert in alerts:
        aux = found(db.ZTF_alerts_aux.find_one({"_id": alert["objectId"]}))
        keys = [history_key(p) for p in aux["prv_candidates"]]
        assert len(keys) == len(set(keys)), alert["objectId"]  # no duplicated history point
        assert alert["candid"] in {p.get("candid") for p in aux["prv_candidates"]}
    # the object with two alerts keeps both detections and all earlier points of both packets
    for path in ztf_files():
        packet = decode_packet(path.read_bytes())[0]
        if packet["candid"] in expected:
            aux = found(db.ZTF_alerts_aux.find_one({"_id": packet["objectId"]}))
            stored = {history_key(p) for p in aux["prv_candidates"]}
            earlier = {history_key(p) for p in packet["prv_candidates"] or []}
            assert earlier <= stored, packet["objectId"]
    assert db.dead_letters.count_documents({}) == 0


def ingest_until(
    ingester: Ingester,
    done: Callable[[], bool],
    trigger: Callable[[], bool],
    fault: Callable[[], None],
) -> None:
    """Run `ingester` in a thread; call `fault` once `trigger` holds, stop once `done` holds."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ingester.run(stop=stop)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(trigger, "the fault's trigger point")
        fault()
        wait_for(done, "every alert to be completed")
    finally:
        stop.set()
        thread.join(DEADLINE)
    assert not errors, errors


def test_cluster_ids_are_kafka_style() -> None:
    """Like Kafka's Uuid.randomUuid: 22 base64url characters of 16 random bytes, never a leading
    '-' (the old generator gave one about once in 64 draws and broke `up --local`)."""
    draws = [cluster_id() for _ in range(20_000)]
    assert len(set(draws)) == len(draws)
    for value in draws:
        assert len(value) == 22 and not value.startswith("-")
        assert len(base64.urlsafe_b64decode(value + "==")) == 16
    assert any(v[0] == "_" for v in draws)  # '_' is fine at the start, as in Kafka


def test_ingester_killed_mid_batch_and_restarted(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, tmp_path: Path
) -> None:
    """A real `python -m ingester` process is SIGKILLed while batches are being processed, then
    started again: nothing is lost, nothing is doubled."""
    tag = uuid.uuid4().hex[:8]
    environ = {
        **night_environ(test_environ, kafka_bootstrap, tag),
        "KOWALSKI__ingester__batch_size": "2",
        "KOWALSKI__kafka__group": f"killed-{tag}",
        "KOWALSKI__dask__n_workers": "1",
    }
    cfg = build_config([], environ)
    db: Database[Doc] = MongoClient(mongo_uri)[cfg.database.db]
    add_filter(db)
    files = ztf_files()
    replay(kafka_bootstrap, files, suffix=f"_{tag}", progress=False)
    command = [sys.executable, "-m", "ingester", "--survey", "ZTF", "--threads"]
    log = (tmp_path / "ingester.log").open("wb")
    first = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=log, stderr=log)
    try:
        # kill as soon as a batch is stored but not completed, or at the latest after 4 alerts
        wait_for(
            lambda: (
                db.ZTF_alerts.count_documents({}) > ledger_count(db)
                or db.ZTF_alerts.count_documents({}) >= 4
                or first.poll() is not None
            ),
            "the first alerts to be stored",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    assert first.returncode == -signal.SIGKILL
    assert ledger_count(db) < len(files)  # it really died with work left
    second = subprocess.run(
        [*command, "--until-idle", "6"], cwd=ROOT, env=environ, stdout=log, stderr=log
    )
    assert second.returncode == 0
    assert_exactly_once(db, candids_of(files))


@pytest.fixture
def process_cluster() -> Iterator[Client]:
    with local_cluster(workers=1, processes=True) as client:
        yield client


def test_dask_worker_dies_mid_batch(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    process_cluster: Client,
) -> None:
    """The worker process is SIGKILLed while it holds a batch: the batch is redone elsewhere."""
    tag = uuid.uuid4().hex[:8]
    cfg = build_config(
        [],
        {
            **night_environ(test_environ, kafka_bootstrap, tag),
            "KOWALSKI__ingester__batch_size": "4",
        },
    )
    db: Database[Doc] = MongoClient(mongo_uri)[cfg.database.db]
    add_filter(db)
    files = ztf_files()
    replay(kafka_bootstrap, files, suffix=f"_{tag}", progress=False)
    ingester = Ingester(cfg, process_cluster, kafka_bootstrap, ["ZTF"], group=f"worker-{tag}")

    def kill_workers() -> None:
        for pid in process_cluster.run(os.getpid).values():
            os.kill(pid, signal.SIGKILL)

    ingest_until(
        ingester,
        done=lambda: ledger_count(db) == len(files),
        trigger=lambda: bool(ingester.in_flight) and db.ZTF_alerts.count_documents({}) > 0,
        fault=kill_workers,
    )
    assert_exactly_once(db, candids_of(files))


@pytest.fixture
def thread_cluster() -> Iterator[Client]:
    with local_cluster(workers=1) as client:
        yield client


def test_kafka_broker_restarted_during_ingestion(
    test_environ: dict[str, str], mongo_uri: str, thread_cluster: Client, tmp_path: Path
) -> None:
    """A broker of its own is stopped mid-stream and started again on the same data; the rest
    of the night is produced after the restart. Everything lands once."""
    broker = LocalKafka.on_free_ports(tmp_path / "kafka").start()
    try:
        bootstrap = broker.bootstrap_servers
        tag = uuid.uuid4().hex[:8]
        cfg = build_config(
            [],
            {**night_environ(test_environ, bootstrap, tag), "KOWALSKI__ingester__batch_size": "4"},
        )
        db: Database[Doc] = MongoClient(mongo_uri)[cfg.database.db]
        add_filter(db)
        files = ztf_files()
        before, after = files[:20], files[20:]
        replay(bootstrap, before, suffix=f"_{tag}", progress=False)
        ingester = Ingester(cfg, thread_cluster, bootstrap, ["ZTF"], group=f"broker-{tag}")

        def restart_broker() -> None:
            broker.stop()
            broker.start()
            replay(bootstrap, after, suffix=f"_{tag}", progress=False)

        ingest_until(
            ingester,
            done=lambda: ledger_count(db) == len(files),
            trigger=lambda: ingester.committed >= 4,
            fault=restart_broker,
        )
        assert_exactly_once(db, candids_of(files))
    finally:
        broker.stop()


def test_database_restarted_during_ingestion(
    test_environ: dict[str, str], kafka_bootstrap: str, thread_cluster: Client, tmp_path: Path
) -> None:
    """A database of its own is stopped gracefully mid-stream and started again: ingestion
    resumes and nothing is lost or doubled."""
    server = EmbeddedMongo(tmp_path / "db", free_port()).start()
    try:
        tag = uuid.uuid4().hex[:8]
        environ = {
            **night_environ({**test_environ, "MONGODB_URI": server.uri}, kafka_bootstrap, tag),
            "KOWALSKI__ingester__batch_size": "4",
        }
        cfg = build_config([], environ)
        db: Database[Doc] = MongoClient(server.uri, serverSelectionTimeoutMS=2000)[cfg.database.db]
        add_filter(db)
        files = ztf_files()
        replay(kafka_bootstrap, files, suffix=f"_{tag}", progress=False)
        ingester = Ingester(cfg, thread_cluster, kafka_bootstrap, ["ZTF"], group=f"db-{tag}")

        def restart_database() -> None:
            server.stop()
            server.start()

        ingest_until(
            ingester,
            done=lambda: ledger_count(db) == len(files),
            trigger=lambda: ingester.committed >= 4,
            fault=restart_database,
        )
        assert_exactly_once(db, candids_of(files))
    finally:
        server.stop()


def poison_packets() -> dict[str, tuple[bytes, str]]:
    """Bad packets made from real ones (altered here, in the test): name -> (bytes, reason)."""
    source = ztf_files("20231012")
    real = source[0].read_bytes()

    def without_cutouts(record: Doc) -> Doc:
        return {**record, "cutoutScience": None, "cutoutTemplate": None, "cutoutDifference": None}

    def nan_coordinates(record: Doc) -> Doc:
        return {**record, "candidate": {**record["candidate"], "ra": math.nan, "dec": math.nan}}

    pgir = sorted(OTHER_ALERTS.rglob("pgir_alerts/**/*.avro"))[0].read_bytes()
    return {
        "truncated": (real[: len(real) // 2], "decode"),
        "garbage": (b"\x00garbage bytes, not an alert" * 10, "decode"),
        "other survey": (pgir, "schema 'pgir' is not a ZTF alert schema"),
        "no cutouts": (altered_packet(source[1], without_cutouts), "missing cutouts"),
        "nan coordinates": (altered_packet(source[2], nan_coordinates), "coordinates not finite"),
    }


def test_poison_packets_go_to_dead_letters_and_good_ones_are_archived(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, thread_cluster: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    cfg = build_config([], night_environ(test_environ, kafka_bootstrap, tag))
    db: Database[Doc] = MongoClient(mongo_uri)[cfg.database.db]
    add_filter(db)
    good = ztf_files("20200202")
    poison = poison_packets()
    topic = f"ztf_20200202_programid1_{tag}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    bad = iter(poison.values())
    for i, path in enumerate(good):  # poison mixed into the real stream
        producer.produce(topic, path.read_bytes())
        if i % 2 == 0 and (item := next(bad, None)):
            producer.produce(topic, item[0])
    assert producer.flush(30) == 0
    ingester = Ingester(cfg, thread_cluster, kafka_bootstrap, ["ZTF"], group=f"poison-{tag}")
    total = len(good) + len(poison)
    ingest_until(
        ingester,
        done=lambda: ingester.committed >= total,
        trigger=lambda: True,
        fault=lambda: None,
    )
    letters = list(db.dead_letters.find())
    dead = {bytes(d["packet"]): d["error"] for d in letters}
    assert len(letters) == len(dead) == len(poison)  # each once
    for name, (packet, reason) in poison.items():
        assert reason in dead[packet], (name, dead[packet])
    db.dead_letters.delete_many({})
    assert_exactly_once(db, candids_of(good))
