"""End to end through real Kafka, real dask workers and the real database: every bundled packet."""

from __future__ import annotations

import csv
import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Producer
from distributed import Client
from pymongo import AsyncMongoClient, MongoClient
from pymongo.database import Database

from ingester.consumer import Ingester
from ingester.decode import decode_packet, writer_schema
from ingester.ml import load_models
from ingester.pipeline import Packet, Pipeline
from ingester.replay import replay
from kowalski.config import Config, build_config
from kowalski.coords import coordinates_block
from kowalski.services.dask import local_cluster
from kowalski.surveys import SURVEYS as SURVEY_REGISTRY
from kowalski.testing.filters import filter_document

from .conftest import DATA, OTHER_ALERTS, ZTF_ALERTS, found
from .test_ml import COLUMNS

SURVEYS = ["ZTF", "PGIR", "WNTR", "TURBO"]
EXPECTED = {  # alerts / objects per survey in the bundled real data
    "ZTF_alerts": 38,
    "ZTF_alerts_aux": 37,
    "PGIR_alerts": 17,
    "PGIR_alerts_aux": 15,
    "WNTR_alerts": 11,
    "WNTR_alerts_aux": 11,
    "TURBO_alerts": 11,
    "TURBO_alerts_aux": 11,
}
FILTER = [{"$match": {"candidate.drb": {"$gt": 0.9}}}, {"$project": {"candid": 1, "objectId": 1}}]


def altered_packet(path: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> bytes:
    """A real packet re-encoded with its own writer schema after `change` altered its alert."""
    raw = path.read_bytes()
    [record] = decode_packet(raw)
    schema = fastavro.parse_schema(writer_schema(raw), _ignore_default_error=True)
    out = io.BytesIO()
    fastavro.writer(out, schema, [change(record)])
    return out.getvalue()


def packets_of(paths: list[Path]) -> list[Packet]:
    return [Packet("t", 0, i, p.read_bytes()) for i, p in enumerate(paths)]


def all_packets() -> list[Path]:
    return sorted([*ZTF_ALERTS.rglob("*.avro"), *OTHER_ALERTS.rglob("*.avro")])


def night_config(test_environ: dict[str, str], kafka: str, tag: str, **extra: str) -> Config:
    return build_config([], night_environ(test_environ, kafka, tag, **extra))


def night_environ(
    test_environ: dict[str, str], kafka: str, tag: str, **extra: str
) -> dict[str, str]:
    """Environment of an ingester of its own: database `ingest_<tag>`, topics ending in `_<tag>`."""
    return {
        **test_environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "KOWALSKI__database__db": f"ingest_{tag}",
        "KOWALSKI__kafka__topics__ZTF": f"^ztf_[0-9]{{8}}_programid[123]_{tag}$",
        "KOWALSKI__kafka__topics__PGIR": f"^pgir_[0-9]{{8}}_{tag}$",
        "KOWALSKI__kafka__topics__WNTR": f"^winter_[0-9]{{8}}_{tag}$",
        "KOWALSKI__kafka__topics__TURBO": f"^turbo_[0-9]{{8}}_{tag}$",
        **extra,
    }


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Client]:
    with local_cluster(workers=2) as client:
        yield client


def run_ingester(
    cfg: Config, client: Client, kafka: str, group: str | None = None, **kwargs: object
) -> Ingester:
    group = group or f"{cfg.kafka.group}-{cfg.database.db}"
    ingester = Ingester(cfg, client, kafka, SURVEYS, group=group)
    ingester.run(**kwargs)  # type: ignore[arg-type]
    return ingester


def stop_when_committed(ingester: Ingester, count: int, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        if ingester.committed >= count:
            stop.set()


def db_of(mongo_uri: str, cfg: Config) -> Database[dict[str, Any]]:
    return MongoClient[dict[str, Any]](mongo_uri)[cfg.database.db]


@pytest.fixture(scope="module")
def ingested(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, dask_client: Client
) -> tuple[Config, Ingester]:
    tag = uuid.uuid4().hex[:8]
    cfg = night_config(test_environ, kafka_bootstrap, tag)
    db = db_of(mongo_uri, cfg)
    # a small catalog around a real alert: one source 1" away (inside 2"), one 3" away (outside)
    alert = decode_packet((ZTF_ALERTS / "20200202" / "1105522281015015000.avro").read_bytes())[0]
    ra, dec = alert["candidate"]["ra"], alert["candidate"]["dec"]
    db.Gaia_EDR3.insert_many(
        [
            {
                "_id": 1,
                "phot_g_mean_mag": 17.2,
                "coordinates": coordinates_block(ra, dec + 1 / 3600),
            },
            {
                "_id": 2,
                "phot_g_mean_mag": 18.9,
                "coordinates": coordinates_block(ra, dec + 3 / 3600),
            },
        ]
    )
    db.Gaia_EDR3.create_index([("coordinates.radec_geojson", "2dsphere")])
    db.filters.insert_one(filter_document(1, FILTER, group_id=1, fid="abcdef"))
    counts = replay(kafka_bootstrap, all_packets(), suffix=f"_{tag}", progress=False)
    assert sum(counts.values()) == len(all_packets()) == 77
    ingester = run_ingester(cfg, dask_client, kafka_bootstrap, until_idle=4.0)
    return cfg, ingester


def test_exact_counts_per_survey(ingested: tuple[Config, Ingester], mongo_uri: str) -> None:
    cfg, ingester = ingested
    db = db_of(mongo_uri, cfg)
    counts = {name: db[name].count_documents({}) for name in EXPECTED}
    assert counts == EXPECTED
    assert ingester.committed == 77
    assert ingester.report.stored == 77 and ingester.report.duplicates == 0
    assert db.dead_letters.count_documents({}) == 0


def test_ml_scores_match_reference(ingested: tuple[Config, Ingester], mongo_uri: str) -> None:
    cfg, _ = ingested
    db = db_of(mongo_uri, cfg)
    rows = list(csv.DictReader((DATA / "reference" / "ml_scores.csv").open()))
    assert len(rows) == 38
    for row in rows:
        doc = found(db.ZTF_alerts.find_one({"candid": int(row["candid"])}, {"classifications": 1}))
        for model, column in COLUMNS.items():
            assert doc["classifications"][model] == pytest.approx(float(row[column]), abs=1e-5), (
                row["file"],
                model,
            )
        assert doc["classifications"]["braai_version"] == "d6_m9"


def test_alert_and_history_documents(ingested: tuple[Config, Ingester], mongo_uri: str) -> None:
    cfg, _ = ingested
    db = db_of(mongo_uri, cfg)
    alert = found(db.ZTF_alerts.find_one({"candid": 1127561445515015011}))
    assert alert["objectId"] == "ZTF20aajcbhr"
    assert alert["coordinates"]["radec_geojson"]["coordinates"][0] == pytest.approx(
        alert["candidate"]["ra"] - 180
    )
    assert "prv_candidates" not in alert and alert["cutoutScience"]["stampData"][:2] == b"\x1f\x8b"
    aux = found(db.ZTF_alerts_aux.find_one({"_id": alert["objectId"]}))
    # upstream: 31 prv_candidates in the packet; the current detection is kept too
    assert len(aux["prv_candidates"]) == 32
    assert any(p.get("candid") == 1127561445515015011 for p in aux["prv_candidates"])
    assert set(aux["cross_matches"]) == set(cfg.database.xmatch["ZTF"])
    fp_alert = found(
        db.ZTF_alerts_aux.find_one(
            {"_id": found(db.ZTF_alerts.find_one({"candid": 2475433850015010009}))["objectId"]}
        )
    )
    jds = [p["jd"] for p in fp_alert.get("fp_hists", [])]
    assert jds == sorted(jds) and len(jds) == len(set(jds))


def test_cross_match_radius_on_real_alert(
    ingested: tuple[Config, Ingester], mongo_uri: str
) -> None:
    cfg, _ = ingested
    db = db_of(mongo_uri, cfg)
    aux = found(db.ZTF_alerts_aux.find_one({"_id": "ZTF20aaelulu"}))
    assert [m["_id"] for m in aux["cross_matches"]["Gaia_EDR3"]] == [1]
    assert aux["cross_matches"]["Gaia_EDR3"][0]["phot_g_mean_mag"] == 17.2


def test_filter_passes_exactly_the_expected_alerts(
    ingested: tuple[Config, Ingester], mongo_uri: str
) -> None:
    cfg, _ = ingested
    db = db_of(mongo_uri, cfg)
    expected = set()
    for path in ZTF_ALERTS.rglob("*.avro"):
        cand = decode_packet(path.read_bytes())[0]["candidate"]
        if (cand.get("drb") or 0) > 0.9:
            expected.add(cand["candid"])
    runs = list(db.filter_runs.find({"filter_id": 1}))
    passed = {c for run in runs for c in run["passed"]}
    ran_on = {c for run in runs for c in run["candids"]}
    assert passed == expected and len(expected) > 10
    assert ran_on == {d["candid"] for d in db.ZTF_alerts.find({}, {"candid": 1})}


def test_bad_packet_goes_to_dead_letters(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, dask_client: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    cfg = night_config(test_environ, kafka_bootstrap, tag)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    good = (ZTF_ALERTS / "20200202" / "1127561445515015011.avro").read_bytes()
    producer.produce(f"ztf_20200202_programid1_{tag}", b"definitely not avro")
    producer.produce(f"ztf_20200202_programid1_{tag}", good)
    producer.flush(30)
    run_ingester(cfg, dask_client, kafka_bootstrap, until_idle=3.0)
    db = db_of(mongo_uri, cfg)
    dead = list(db.dead_letters.find())
    assert len(dead) == 1 and dead[0]["packet"] == b"definitely not avro"
    assert "decode" in dead[0]["error"]
    assert db.ZTF_alerts.count_documents({}) == 1


def test_restart_and_crash_lose_and_duplicate_nothing(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, dask_client: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    cfg = night_config(test_environ, kafka_bootstrap, tag, KOWALSKI__ingester__batch_size="4")
    replay(kafka_bootstrap, sorted(ZTF_ALERTS.rglob("*.avro")), suffix=f"_{tag}", progress=False)
    db = db_of(mongo_uri, cfg)

    # 1. stop cleanly mid-stream: what is in flight is finished and committed
    stop = threading.Event()
    first = Ingester(cfg, dask_client, kafka_bootstrap, SURVEYS, group=f"g-{tag}")
    watcher = threading.Thread(target=stop_when_committed, args=(first, 8, stop))
    watcher.start()
    first.run(stop=stop)
    watcher.join()
    stored_after_stop = db.ZTF_alerts.count_documents({})
    assert 8 <= stored_after_stop < 38 and first.committed == stored_after_stop

    # 2. a "crash": one batch processed and stored, but its offsets never committed
    crashed = Ingester(cfg, dask_client, kafka_bootstrap, SURVEYS, group=f"g-{tag}")
    while not crashed.poll_once() and not crashed.in_flight:
        pass
    crashed.in_flight[0].future.result()
    crashed.in_flight.clear()  # the process "dies": its stored batch is never committed
    crashed.consumer.close()
    assert db.ZTF_alerts.count_documents({}) > stored_after_stop

    # 3. restart: resumes at the committed offset; the re-delivered batch is recognised
    last = run_ingester(cfg, dask_client, kafka_bootstrap, group=f"g-{tag}", until_idle=4.0)
    assert db.ZTF_alerts.count_documents({}) == 38
    assert len(db.ZTF_alerts.distinct("candid")) == 38
    assert last.report.duplicates >= 1
    assert first.committed + last.committed == 38


def test_database_outage_is_retried_and_nothing_is_dropped(
    test_environ: dict[str, str], kafka_bootstrap: str, dask_client: Client, tmp_path: Path
) -> None:
    """The database goes away mid-stream and comes back: the batch waits/retries, then lands."""
    from kowalski.services.mongo import EmbeddedMongo
    from kowalski.services.process import free_port

    port = free_port()
    server = EmbeddedMongo(tmp_path / "db", port).start()
    tag = uuid.uuid4().hex[:8]
    cfg = night_config({**test_environ, "MONGODB_URI": server.uri}, kafka_bootstrap, tag)
    ingester = Ingester(cfg, dask_client, kafka_bootstrap, SURVEYS, group=f"outage-{tag}")
    server.stop()  # the database is down before any alert arrives
    replay(
        kafka_bootstrap,
        sorted((ZTF_ALERTS / "20200202").glob("*.avro")),
        suffix=f"_{tag}",
        progress=False,
    )
    restart = threading.Timer(6.0, server.start)
    restart.start()
    try:
        ingester.run(until_idle=4.0)
    finally:
        restart.join()
    try:
        db = MongoClient[dict[str, Any]](server.uri)[cfg.database.db]
        assert db.ZTF_alerts.count_documents({}) == 12, (
            ingester.committed,
            ingester.assigned,
            ingester.report,
        )
        assert ingester.committed == 12
    finally:
        server.stop()


def test_two_ingesters_share_partitions(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, dask_client: Client
) -> None:
    # confluent_kafka.admin re-exports NewTopic (its documented home) without listing it in __all__
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    tag = uuid.uuid4().hex[:8]
    topic = f"ztf_20200202_programid1_{tag}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)
    cfg = night_config(test_environ, kafka_bootstrap, tag, KOWALSKI__ingester__batch_size="4")
    group = f"shared-{tag}"
    ingesters = [
        Ingester(cfg, dask_client, kafka_bootstrap, SURVEYS, group=group) for _ in range(2)
    ]
    threads = [threading.Thread(target=ing.run, kwargs={"until_idle": 8.0}) for ing in ingesters]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while not all(i.assigned for i in ingesters) and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until both members of the group hold a partition
    assert [len(i.assigned) for i in ingesters] == [1, 1]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    files = sorted(ZTF_ALERTS.rglob("*.avro"))
    for i, path in enumerate(files):
        producer.produce(topic, path.read_bytes(), partition=i % 2)
    assert producer.flush(30) == 0
    for thread in threads:
        thread.join(180)
    db = db_of(mongo_uri, cfg)
    assert db.ZTF_alerts.count_documents({}) == len(files) == 38
    assert len(db.ZTF_alerts.distinct("candid")) == 38
    assert sum(i.committed for i in ingesters) == 38  # each packet committed once, by one of them
    assert all(i.committed > 0 for i in ingesters)  # both took a share


async def test_a_catalog_that_cannot_be_queried_is_left_unmatched_and_matched_later(
    test_environ: dict[str, str], mongo: AsyncMongoClient[dict[str, Any]]
) -> None:
    """A configured catalog whose query the database refuses (an invalid operator in its
    configured filter): no alert is stored as "matched, nothing found"; the catalog stays absent
    from `cross_matches`, is counted, and is matched with the object's next alert once fixed."""
    cfg = build_config(
        [], {**test_environ, "KOWALSKI__database__db": f"xmatch_{uuid.uuid4().hex[:8]}"}
    )
    db = mongo[cfg.database.db]
    day = ZTF_ALERTS / "20200202"
    later = day / "1127536316315015004.avro"  # the second alert of ZTF20aaelulx (same object)
    first = [p for p in sorted(day.glob("*.avro")) if p != later]
    alert = decode_packet(later.read_bytes())[0]
    ra, dec = alert["candidate"]["ra"], alert["candidate"]["dec"]
    await db.Nearby.insert_one({"_id": 1, "coordinates": coordinates_block(ra, dec)})
    catalogs = cfg.database.xmatch["ZTF"]
    spec = next(iter(catalogs.values()))
    catalogs["Nearby"] = spec.model_copy(update={"filter": {"$notAnOperator": 1}})

    report = await Pipeline(cfg, db, {}).process(SURVEY_REGISTRY["ZTF"], packets_of(first))
    assert report.stored == 11 and report.xmatch_failures == 1
    aux = await db.ZTF_alerts_aux.find({}).to_list()
    assert len(aux) == 11
    assert all("Nearby" not in a["cross_matches"] for a in aux)
    assert all(set(a["cross_matches"]) == set(catalogs) - {"Nearby"} for a in aux)

    catalogs["Nearby"] = spec.model_copy(update={"filter": {}})
    report = await Pipeline(cfg, db, {}).process(SURVEY_REGISTRY["ZTF"], packets_of([later]))
    assert report.xmatch_failures == 0
    doc = found(await db.ZTF_alerts_aux.find_one({"_id": alert["objectId"]}))
    assert [m["_id"] for m in doc["cross_matches"]["Nearby"]] == [1]
    await mongo.drop_database(cfg.database.db)


async def test_ml_failures_are_counted_and_scores_left_absent(
    test_environ: dict[str, str], mongo: AsyncMongoClient[dict[str, Any]]
) -> None:
    """Two real model failures: braai configured with another model's ONNX file (ACAI's, which
    wants features too, so every braai call fails), and one real packet altered so its science
    cutout is not a gzipped FITS image (no model can score it). Scores are absent, never 0."""
    cfg = build_config(
        [],
        {
            **test_environ,
            "KOWALSKI__database__db": f"ml_{uuid.uuid4().hex[:8]}",
            "KOWALSKI__ml__ZTF__models__braai__onnx": "onnx/acai_h.d1_dnn_20201130.onnx",
        },
    )
    models = load_models(cfg, "ZTF")
    db = mongo[cfg.database.db]
    paths = sorted((ZTF_ALERTS / "20200202").glob("*.avro"))
    broken = int(paths[0].stem)

    def garble_cutout(record: dict[str, Any]) -> dict[str, Any]:
        record["cutoutScience"]["stampData"] = b"\x1f\x8b not a gzipped FITS stamp"
        return record

    packets = packets_of(paths)
    packets[0] = Packet("t", 0, 0, altered_packet(paths[0], garble_cutout))
    report = await Pipeline(cfg, db, {"ZTF": models}).process(SURVEY_REGISTRY["ZTF"], packets)
    assert report.stored == 12
    # 7 models x the broken alert + braai on the 11 others
    assert report.ml_failures == len(models) + 11
    docs = {d["candid"]: d["classifications"] async for d in db.ZTF_alerts.find()}
    assert docs[broken] == {}
    for candid, scores in docs.items():
        assert "braai" not in scores
        if candid != broken:
            assert 0 < scores["acai_h"] < 1 and "bts" in scores
    await mongo.drop_database(cfg.database.db)
