"""Results stream through real Kafka, the real database and real packets: what is published, the
schema, the filter option, and exactly once across real process kills."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient
from distributed import Client
from pymongo import MongoClient
from pymongo.database import Database

from ingester.consumer import Ingester
from ingester.replay import replay
from kowalski import results
from kowalski.config import ROOT, Config, ConfigError, build_config
from kowalski.testing.filters import filter_document

from .conftest import ZTF_ALERTS, leak_messages
from .test_ingestion import dask_client  # noqa: F401  (module fixture, reused)

DRB: list[dict[str, Any]] = [
    {"$match": {"candidate.drb": {"$gt": 0.9}}},
    {"$project": {"candid": 1, "objectId": 1, "drb": "$candidate.drb"}},
]
EVERYTHING: list[dict[str, Any]] = [
    {"$match": {"candid": {"$gt": 0}}},
    {"$project": {"candid": 1, "objectId": 1}},
]
DEADLINE_S = 180.0


@dataclass(frozen=True)
class Published:
    key: str
    record: dict[str, Any]
    headers: dict[str, str]


def results_env(test_environ: dict[str, str], kafka: str, tag: str, **extra: str) -> dict[str, str]:
    return {
        **test_environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "KOWALSKI__database__db": f"results_{tag}",
        "KOWALSKI__kafka__group": f"results-{tag}",
        "KOWALSKI__kafka__topics__ZTF": f"^ztf_[0-9]{{8}}_programid[123]_{tag}$",
        "KOWALSKI__kafka__results_topic": f"kowalski_filter_{{filter_id}}_{tag}",
        **extra,
    }


def topic_exists(kafka: str, topic: str) -> bool:
    return topic in AdminClient({"bootstrap.servers": kafka}).list_topics(timeout=30).topics


def header_texts(msg: Message) -> dict[str, str]:
    """A published record's headers, decoded (the publisher writes them as a list of bytes)."""
    raw = msg.headers() or []
    assert isinstance(raw, list), raw
    texts: dict[str, str] = {}
    for name, value in raw:
        assert isinstance(value, bytes), (name, value)
        texts[name] = value.decode()
    return texts


def read_all(kafka: str, topic: str, isolation: str = "read_committed") -> list[Published]:
    """Every message of `topic` up to its end (for read_committed: its last stable offset)."""
    if not topic_exists(kafka, topic):
        return []
    consumer = Consumer(
        {
            "bootstrap.servers": kafka,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        out: list[Published] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            error = msg.error()
            if error:
                assert error.code() == KafkaError._PARTITION_EOF, error
                partition = msg.partition()
                assert partition is not None
                at_end.add(partition)
                continue
            key, value = msg.key(), msg.value()
            assert key is not None and value is not None
            out.append(Published(key.decode(), results.decode(value), header_texts(msg)))
        assert len(at_end) == len(partitions), f"{topic}: end not reached"
        return out
    finally:
        consumer.close()


def passed_by_filter_runs(db: Any, filter_id: int) -> list[int]:
    return sorted(c for run in db.filter_runs.find({"filter_id": filter_id}) for c in run["passed"])


def ztf_packets() -> list[Path]:
    return sorted(ZTF_ALERTS.rglob("*.avro"))


# ------------------------------------------------------------------ in process


@pytest.fixture(scope="module")
def streamed(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    dask_client: Client,  # noqa: F811
) -> tuple[Config, Any, Ingester]:
    tag = uuid.uuid4().hex[:8]
    cfg = build_config([], results_env(test_environ, kafka_bootstrap, tag))
    db: Database[dict[str, Any]] = MongoClient(mongo_uri)[cfg.database.db]
    db.filters.insert_many(
        [
            filter_document(1, DRB, stream={"active": True, "cutouts": True, "lightcurve": True}),
            filter_document(2, EVERYTHING, permissions=[1], stream={"lightcurve": True}),
            filter_document(3, EVERYTHING),  # no stream option: publishes nothing
            filter_document(4, EVERYTHING, stream=False),
        ]
    )
    replay(kafka_bootstrap, ztf_packets(), suffix=f"_{tag}", progress=False)
    ingester = Ingester(cfg, dask_client, kafka_bootstrap, ["ZTF"], group=f"g-{tag}")
    ingester.run(until_idle=4.0)
    return cfg, db, ingester


def test_passes_published_for_exactly_the_passing_alerts(
    streamed: tuple[Config, Any, Ingester], kafka_bootstrap: str
) -> None:
    cfg, db, ingester = streamed
    assert ingester.committed == 38 and db.ZTF_alerts.count_documents({}) == 38
    published = read_all(kafka_bootstrap, results.topic_for(cfg, 1, "ZTF"))
    expected = passed_by_filter_runs(db, 1)
    assert len(expected) > 10
    assert sorted(p.record["candid"] for p in published) == expected  # each once
    assert ingester.publisher.published == len(expected) + 37  # filters 1 and 2
    for item in published:
        record = item.record
        alert = db.ZTF_alerts.find_one({"candid": record["candid"]})
        assert item.key == record["objectId"] == alert["objectId"]
        assert item.headers[results.DEDUP_HEADER] == f"{record['candid']}:1:v1"
        assert item.headers[results.SCHEMA_HEADER] == results.schema_name()
        assert (record["filter_id"], record["fid"], record["group_id"]) == (1, "v1", 101)
        assert record["survey"] == "ZTF" and record["catalog"] == "ZTF_alerts"
        assert record["candidate"]["magpsf"] == pytest.approx(alert["candidate"]["magpsf"])
        assert json.loads(record["annotations"]) == {
            "drb": pytest.approx(alert["candidate"]["drb"])
        }
        assert record["classifications"]["braai"] == pytest.approx(
            alert["classifications"]["braai"]
        )
        assert set(json.loads(record["cross_matches"])) == set(cfg.database.xmatch["ZTF"])
        science = record["cutouts"]["science"]
        assert science == alert["cutoutScience"]["stampData"] and science[:2] == b"\x1f\x8b"
        jds = [p["jd"] for p in record["light_curve"]]
        assert jds == sorted(jds) and record["candidate"]["jd"] in jds
        assert record["forced_photometry"] is not None


def test_permissions_hold_for_a_programid_1_filter(
    streamed: tuple[Config, Any, Ingester], kafka_bootstrap: str
) -> None:
    cfg, db, _ = streamed
    published = read_all(kafka_bootstrap, results.topic_for(cfg, 2, "ZTF"))
    programid_1 = sorted(
        d["candid"] for d in db.ZTF_alerts.find({"candidate.programid": 1}, {"candid": 1})
    )
    assert sorted(p.record["candid"] for p in published) == passed_by_filter_runs(db, 2)
    assert sorted(p.record["candid"] for p in published) == programid_1 and len(programid_1) == 37
    points = [q for p in published for q in p.record["light_curve"]]
    assert points and {q["programid"] for q in points} == {1}
    hidden = db.ZTF_alerts_aux.count_documents({"prv_candidates.programid": {"$in": [2, 3]}})
    assert hidden > 0  # the archive holds partnership points: the filter's view left them out
    assert all(p.record["cutouts"] is None for p in published)


def test_filters_without_stream_publish_nothing(
    streamed: tuple[Config, Any, Ingester], kafka_bootstrap: str, mongo_uri: str
) -> None:
    cfg, db, _ = streamed
    assert len(passed_by_filter_runs(db, 3)) == len(passed_by_filter_runs(db, 4)) == 38
    assert not topic_exists(kafka_bootstrap, results.topic_for(cfg, 3, "ZTF"))
    assert not topic_exists(kafka_bootstrap, results.topic_for(cfg, 4, "ZTF"))
    assert db.results_outbox.count_documents({}) == 0  # committed records are cleaned up


def test_disabling_stream_stops_publishing_from_the_next_batch(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    dask_client: Client,  # noqa: F811
) -> None:
    tag = uuid.uuid4().hex[:8]
    cfg = build_config([], results_env(test_environ, kafka_bootstrap, tag))
    db: Database[dict[str, Any]] = MongoClient(mongo_uri)[cfg.database.db]
    db.filters.insert_one(filter_document(1, EVERYTHING, stream=True))
    topic = results.topic_for(cfg, 1, "ZTF")
    nights = [sorted((ZTF_ALERTS / night).glob("*.avro")) for night in ("20200202", "20231012")]
    replay(kafka_bootstrap, nights[0], suffix=f"_{tag}", progress=False)
    Ingester(cfg, dask_client, kafka_bootstrap, ["ZTF"], group=f"g-{tag}").run(until_idle=4.0)
    assert len(read_all(kafka_bootstrap, topic)) == 12

    db.filters.update_one({"filter_id": 1}, {"$set": {"stream": False}})
    replay(kafka_bootstrap, nights[1], suffix=f"_{tag}", progress=False)
    Ingester(cfg, dask_client, kafka_bootstrap, ["ZTF"], group=f"g-{tag}").run(until_idle=4.0)
    assert db.ZTF_alerts.count_documents({}) == 36
    assert len(passed_by_filter_runs(db, 1)) == 36  # the filter still runs and passes them
    assert len(read_all(kafka_bootstrap, topic)) == 12  # but nothing more is published


def test_schema_file_documents_every_field() -> None:
    schema = json.loads(results.SCHEMA_FILE.read_text())
    assert schema["doc"]
    for item in schema["fields"]:
        assert item.get("doc"), item["name"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{item['name']}`" in readme for item in schema["fields"])


def test_topic_template(test_environ: dict[str, str]) -> None:
    cfg = build_config([], test_environ)
    assert results.topic_for(cfg, 7, "ZTF") == "kowalski_filter_7"
    env = {**test_environ, "KOWALSKI__kafka__results_topic": "kowalski_{survey}_passes"}
    assert results.topic_for(build_config([], env), 7, "ZTF") == "kowalski_ztf_passes"
    for bad in ("kowalski_passes", "kowalski_{filter}"):
        with pytest.raises(ConfigError, match="results_topic"):
            build_config([], {**test_environ, "KOWALSKI__kafka__results_topic": bad})


def test_stream_option_values() -> None:
    assert results.validate_stream(True) is True
    assert results.validate_stream({"cutouts": True}) == {
        "active": True,
        "cutouts": True,
        "lightcurve": False,
    }
    for bad in ("yes", {"cutout": True}, {"active": 1}):
        with pytest.raises(ValueError):
            results.validate_stream(bad)
    assert results.stream_options(None) is None
    assert results.stream_options({"active": False, "cutouts": True}) is None
    assert results.stream_options(True) == results.StreamOptions()


async def test_stream_option_through_the_filters_api(
    aiohttp_client: Any, test_environ: dict[str, str]
) -> None:
    from api.app import app_factory

    env = {**test_environ, "KOWALSKI__database__db": f"results_api_{uuid.uuid4().hex[:8]}"}
    client = await aiohttp_client(await app_factory(build_config([], env)))
    auth = await client.post("/api/auth", json={"username": "admin", "password": "admin"})
    headers = {"Authorization": f"Bearer {(await auth.json())['token']}"}
    body = {
        "group_id": 1,
        "filter_id": 7,
        "catalog": "ZTF_alerts",
        "permissions": [1],
        "pipeline": EVERYTHING,
        "stream": {"lightcurve": True},
    }
    assert (await client.post("/api/filters", json=body, headers=headers)).status == 200
    shown = (await (await client.get("/api/filters/7", headers=headers)).json())["data"]
    assert shown["stream"] == {"active": True, "cutouts": False, "lightcurve": True}
    patch = {"filter_id": 7, "stream": False}
    assert (await client.patch("/api/filters", json=patch, headers=headers)).status == 200
    shown = (await (await client.get("/api/filters/7", headers=headers)).json())["data"]
    assert shown["stream"] is False
    bad = await client.patch(
        "/api/filters", json={"filter_id": 7, "stream": {"images": True}}, headers=headers
    )
    assert bad.status == 400 and "stream" in (await bad.json())["message"]


# ------------------------------------------------------------------ real process kills


def run_ingester_process(env: dict[str, str], log: Path, crash_at: str | None) -> int:
    """`python -m ingester` until idle (or until it kills itself at `crash_at`)."""
    child_env = {k: v for k, v in env.items() if k != "KOWALSKI_TEST_CRASH_AT"}
    if crash_at:
        child_env["KOWALSKI_TEST_CRASH_AT"] = crash_at
    with log.open("a") as out:
        out.write(f"\n=== run, crash at {crash_at}\n")
        out.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "ingester", "--survey", "ZTF", "--threads", "--until-idle", "8"],
            cwd=ROOT,
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    return proc.returncode


@pytest.fixture
def process_env(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str
) -> tuple[dict[str, str], Config, Any, str]:
    tag = uuid.uuid4().hex[:8]
    env = results_env(
        {k: v for k, v in test_environ.items() if not k.startswith("KOWALSKI_TEST")},
        kafka_bootstrap,
        tag,
        KOWALSKI__ingester__batch_size="4",
        KOWALSKI__dask__n_workers="1",
        PYTHONPATH=str(ROOT),
    )
    cfg = build_config([], env)
    db: Database[dict[str, Any]] = MongoClient(mongo_uri)[cfg.database.db]
    db.filters.insert_one(filter_document(1, DRB, stream=True))
    replay(kafka_bootstrap, ztf_packets(), suffix=f"_{tag}", progress=False)
    return env, cfg, db, tag


def test_exactly_once_across_kills(
    process_env: tuple[dict[str, str], Config, Any, str], kafka_bootstrap: str, tmp_path: Path
) -> None:
    env, cfg, db, _ = process_env
    topic, log = results.topic_for(cfg, 1, "ZTF"), tmp_path / "ingester.log"

    def committed() -> list[Published]:
        return read_all(kafka_bootstrap, topic)

    def everything() -> list[Published]:
        return read_all(kafka_bootstrap, topic, isolation="read_uncommitted")

    # (a) killed with a batch stored and its results built, before anything was produced
    assert run_ingester_process(env, log, "before_commit") == -9, log.read_text()[-3000:]
    assert everything() == [] and db.results_outbox.count_documents({}) > 0
    # (b) killed after producing inside the transaction, before committing it
    assert run_ingester_process(env, log, "between_produce_and_commit") == -9
    produced = everything()
    assert produced and committed() == []
    # (c) killed right after the commit
    assert run_ingester_process(env, log, "after_commit") == -9
    after_c = committed()
    assert after_c and len(everything()) > len(after_c)
    # (d) to the end, and shut down without leaking a database client
    assert run_ingester_process(env, log, None) == 0, log.read_text()[-3000:]
    assert leak_messages(log.read_text().rsplit("=== run", 1)[-1]) == []

    assert db.ZTF_alerts.count_documents({}) == 38
    expected = passed_by_filter_runs(db, 1)
    final = committed()
    assert sorted(p.record["candid"] for p in final) == expected and len(expected) > 10
    assert all(p.key == p.record["objectId"] for p in final)
    assert len(everything()) > len(final)  # the aborted attempt is in the log, hidden


def test_without_transactions_at_least_once_with_dedup_header(
    process_env: tuple[dict[str, str], Config, Any, str], kafka_bootstrap: str, tmp_path: Path
) -> None:
    env, cfg, db, _ = process_env
    env = {**env, "KOWALSKI__kafka__results__transactions": "false"}
    log = tmp_path / "ingester.log"
    assert run_ingester_process(env, log, "between_produce_and_commit") == -9, log.read_text()[
        -3000:
    ]
    assert run_ingester_process(env, log, None) == 0, log.read_text()[-3000:]
    final = read_all(kafka_bootstrap, results.topic_for(cfg, 1, "ZTF"))
    expected = passed_by_filter_runs(db, 1)
    assert len(final) > len(expected)  # the batch produced before the kill came again
    unique = {p.headers[results.DEDUP_HEADER]: p.record["candid"] for p in final}
    assert sorted(unique.values()) == expected


def test_a_commit_whose_answer_timed_out_is_retried_not_produced_again(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    dask_client: Client,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """commit_transaction waits 1 ms for the broker's answer, so it times out while the broker
    commits: the commit is retried (which returns success once the broker committed) and no
    batch is produced a second time; every pass is read once with read_committed."""
    from ingester import publisher

    monkeypatch.setattr(publisher, "COMMIT_TIMEOUT_S", 0.001)
    tag = uuid.uuid4().hex[:8]
    env = results_env(test_environ, kafka_bootstrap, tag, KOWALSKI__ingester__batch_size="4")
    cfg = build_config([], env)
    db: Database[dict[str, Any]] = MongoClient(mongo_uri)[cfg.database.db]
    db.filters.insert_one(filter_document(1, EVERYTHING, stream=True))
    replay(kafka_bootstrap, ztf_packets(), suffix=f"_{tag}", progress=False)
    ingester = Ingester(cfg, dask_client, kafka_bootstrap, ["ZTF"], group=f"g-{tag}")
    ingester.run(until_idle=4.0)
    assert ingester.publisher.commit_retries > 0  # the answers did time out
    final = read_all(kafka_bootstrap, results.topic_for(cfg, 1, "ZTF"))
    expected = passed_by_filter_runs(db, 1)
    assert sorted(p.record["candid"] for p in final) == expected and len(expected) == 38
    db.client.close()
