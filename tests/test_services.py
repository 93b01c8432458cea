"""The real servers the project starts: MongoDB wire (SecantusDB or mongod) and Kafka (KRaft)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from pymongo import AsyncMongoClient

from kowalski.coords import cone_clause, coordinates_block
from kowalski.services import secantus
from kowalski.services.mongo import EmbeddedMongo, select_server
from kowalski.services.process import ServiceError, free_port

from .conftest import ztf_alert_files


async def test_async_pymongo_crud_lookup_and_2dsphere(
    mongo: AsyncMongoClient[dict[str, Any]],
) -> None:
    db = mongo[f"svc_{uuid.uuid4().hex[:6]}"]
    sources: list[dict[str, Any]] = [
        {"_id": "near", "ra": 185.7288484, "dec": 15.8236168},
        {"_id": "far", "ra": 185.7288484 + 1.0, "dec": 15.8236168},
        {"_id": "wrap", "ra": 359.9999, "dec": 0.0},
    ]
    for doc in sources:
        doc["coordinates"] = coordinates_block(doc["ra"], doc["dec"])
    await db.catalog.create_index([("coordinates.radec_geojson", "2dsphere")])
    await db.catalog.insert_many(sources)
    await db.aux.insert_one({"_id": "near", "cross_matches": {"x": [1]}})

    assert await db.catalog.count_documents({}) == 3
    found = await db.catalog.find_one({"_id": "far"}, {"ra": 1})
    assert found == {"_id": "far", "ra": 186.7288484}

    arcsec = 3.141592653589793 / 180 / 3600
    inside = await db.catalog.find(cone_clause(185.7288484, 15.8236168, 2 * arcsec)).to_list()
    assert [d["_id"] for d in inside] == ["near"]
    across_zero = await db.catalog.find(cone_clause(0.0001, 0.0, 1 * arcsec)).to_list()
    assert [d["_id"] for d in across_zero] == ["wrap"]

    joined = await (
        await db.catalog.aggregate(
            [
                {"$match": {"_id": {"$in": ["near", "far"]}}},
                {
                    "$lookup": {
                        "from": "aux",
                        "localField": "_id",
                        "foreignField": "_id",
                        "as": "aux",
                    }
                },
                {"$project": {"n": {"$size": "$aux"}}},
                {"$sort": {"_id": 1}},
            ]
        )
    ).to_list()
    assert joined == [{"_id": "far", "n": 0}, {"_id": "near", "n": 1}]
    await mongo.drop_database(db.name)


def test_embedded_mongo_port_in_use_is_one_clear_line(tmp_path: Path, mongo_uri: str) -> None:
    busy = int(mongo_uri.split(":")[2].split("/")[0]) if "127.0.0.1" in mongo_uri else None
    if busy is None:
        pytest.skip("MONGODB_URI points at an external server")
    with pytest.raises(ServiceError) as err:
        EmbeddedMongo(tmp_path / "db", busy).start()
    message = str(err.value)
    assert "\n" not in message
    assert f"port {busy} on 127.0.0.1 is already in use" in message


def test_embedded_mongo_restart_keeps_data(tmp_path: Path) -> None:
    from pymongo import MongoClient

    port = free_port()
    with (
        EmbeddedMongo(tmp_path / "db", port, sync_on_commit=True) as server,
        MongoClient[dict[str, Any]](server.uri) as client,
    ):
        client.k.c.insert_one({"_id": 1})
    with (
        EmbeddedMongo(tmp_path / "db", port) as server,
        MongoClient[dict[str, Any]](server.uri) as client,
    ):
        assert client.k.c.find_one({"_id": 1}) == {"_id": 1}


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 50,
        }
    )


def _drain(consumer: Consumer, want: int, timeout: float = 30) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            raise KafkaException(msg.error())
        got.append(msg.value() or b"")
    return got


def test_kafka_real_packets_with_committed_offsets(kafka_bootstrap: str) -> None:
    packets = [p.read_bytes() for p in ztf_alert_files()[:10]]
    topic = f"ztf_20200202_programid1_{uuid.uuid4().hex[:6]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 10_000_000})
    for packet in packets:
        producer.produce(topic, packet)
    assert producer.flush(30) == 0

    group = f"kowalski-test-{uuid.uuid4().hex[:6]}"
    first = _consumer(kafka_bootstrap, group)
    first.subscribe([topic])
    head = _drain(first, 4)
    assert head == packets[:4]  # byte-identical Avro packets, in order
    first.commit(asynchronous=False)
    first.close()

    second = _consumer(kafka_bootstrap, group)
    second.subscribe([topic])
    rest = _drain(second, 6)
    assert rest == packets[4:]  # resumes after the committed offset: nothing re-read, nothing lost
    committed = second.committed([TopicPartition(topic, 0)], timeout=10)
    assert committed[0].offset == 4
    second.close()


def test_kafka_pattern_subscription_sees_new_topics(kafka_bootstrap: str) -> None:
    night = uuid.uuid4().hex[:6]
    consumer = _consumer(kafka_bootstrap, f"pattern-{night}")
    consumer.subscribe([f"^ztf_[0-9]{{8}}_programid[123]_{night}"])
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    packet = ztf_alert_files()[0].read_bytes()
    for topic in (f"ztf_20240101_programid1_{night}", f"ztf_20240102_programid2_{night}"):
        producer.produce(topic, packet)
    producer.flush(30)
    consumer.close()
    consumer = _consumer(kafka_bootstrap, f"pattern-{night}")
    consumer.subscribe([f"^ztf_[0-9]{{8}}_programid[123]_{night}"])
    assert len(_drain(consumer, 2, timeout=40)) == 2
    consumer.close()


def test_forced_python_server_starts_and_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback path: KOWALSKI_EMBEDDED_DB=py runs secantusd-py whatever is built."""
    from pymongo import MongoClient

    monkeypatch.setenv(secantus.CHOICE_ENV, "py")
    with (
        EmbeddedMongo(tmp_path / "db", free_port()) as server,
        MongoClient[dict[str, Any]](server.uri) as client,
    ):
        assert server.server is not None and server.server.command == secantus.PY_COMMAND
        client.k.c.insert_one({"_id": 1, "coordinates": coordinates_block(10.0, 20.0)})
        assert [d["_id"] for d in client.k.c.find(cone_clause(10.0, 20.0, 1e-6))] == [1]


def test_without_a_built_rust_server_the_python_one_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(secantus.CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.delenv(secantus.CHOICE_ENV, raising=False)
    assert select_server().command == secantus.PY_COMMAND
    monkeypatch.setenv(secantus.CHOICE_ENV, "rs")
    with pytest.raises(ServiceError) as err:
        select_server()
    assert "\n" not in str(err.value) and secantus.RS_COMMAND in str(err.value)


def test_no_cargo_is_one_notice_and_a_failed_build_is_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(secantus.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(secantus.CHOICE_ENV, raising=False)
    monkeypatch.setattr(secantus, "find_cargo", lambda: None)
    notices: list[str] = []
    assert secantus.ensure_rs(say=notices.append) is None
    assert len(notices) == 1 and "secantusd-py" in notices[0]

    failing = tmp_path / "cargo"  # a "cargo" whose build fails at once
    failing.write_text("#!/bin/sh\necho 'error: no registry here' >&2\nexit 101\n")
    failing.chmod(0o755)
    notices.clear()
    assert secantus.ensure_rs(cargo=str(failing), say=notices.append) is None
    assert "failed" in notices[-1] and "no registry here" in secantus.rs_log().read_text()
    notices.clear()
    assert secantus.ensure_rs(cargo=str(failing), say=notices.append) is None
    assert len(notices) == 1 and "did not build before" in notices[0]
