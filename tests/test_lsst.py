"""Rubin/LSST (and DECam) end to end: Confluent-framed packets through real Kafka and dask workers
into the real database, an in-test Confluent schema registry (aiohttp), cross-survey aliases with
ZTF, user filters and catalog cross-matches on LSST, and the API through penquins.

Packets: data/lsst_alerts (3 real Rubin alerts with cutouts, schemas 7.1/7.3/9.0; a container of
10 real v7.1 alerts; Rubin's example alert in 9.0 and 11.1, which share one diaSourceId) and
data/decam_alerts (one DESIRT alert).
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import fastavro
import numpy as np
import pytest
from aiohttp import web
from astropy import units as u
from astropy.io import fits
from bson import json_util
from confluent_kafka import Producer
from distributed import Client
from fastavro.schema import load_schema, to_parsing_canonical_form
from pymongo import MongoClient

from ingester.consumer import Ingester
from ingester.decode import decode_packet, frame_confluent
from ingester.lsst import split_lsst
from ingester.mongify import merge_prv_candidates
from ingester.replay import messages_of, topic_for
from kowalski.config import Config, build_config
from kowalski.coords import coordinates_block
from kowalski.services.api import ApiServer
from kowalski.services.dask import local_cluster
from kowalski.services.process import free_port
from kowalski.surveys import SURVEYS
from kowalski.testing.filters import filter_document

from .conftest import DATA, ZTF_ALERTS

LSST = SURVEYS["LSST"]
LSST_ALERTS = DATA / "lsst_alerts"
SCHEMAS = DATA / "schemas" / "lsst"
CONTAINER = LSST_ALERTS / "schema_701.10alerts.v7_1.container.avro"
WITH_CUTOUTS = LSST_ALERTS / "25409136044802067.v7_1.confluent.avro"
ZTF_PACKET = ZTF_ALERTS / "20200202" / "1127561445515015011.avro"  # ZTF20aajcbhr
INGEST_SURVEYS = ["ZTF", "LSST", "DECAM"]
Doc = dict[str, Any]


# ------------------------------------------------------------------ raw packets, independently


def rubin_schema(schema_id: int) -> Any:
    major, minor = divmod(schema_id, 100)
    return load_schema(str(SCHEMAS / str(major) / str(minor) / f"lsst.v{major}_{minor}.alert.avsc"))


def raw_records(path: Path) -> list[Doc]:
    """The records of a bundled LSST file, read with fastavro alone (not the ingester's code)."""
    data = path.read_bytes()
    if data[0] == 0:
        schema_id = int.from_bytes(data[1:5], "big")
        record = fastavro.schemaless_reader(io.BytesIO(data[5:]), rubin_schema(schema_id), None)
        return [cast(Doc, record)]  # fastavro types a datum as any Avro value: records are dicts
    return [cast(Doc, record) for record in fastavro.reader(io.BytesIO(data))]


def lsst_files() -> list[Path]:
    return sorted(LSST_ALERTS.glob("*.avro"))


def framed(path: Path) -> list[bytes]:
    return messages_of(path.read_bytes(), LSST)


# ------------------------------------------------------------------ in-test schema registry


@dataclass
class Registry:
    """A Confluent schema registry (aiohttp) for Rubin's ids: 701 and 703 are served split, with
    `references` to one subject per named type (diaSource, diaObject, ...); 900 and 1101 as one
    flattened schema. Counts every request per path."""

    url: str = ""
    requests: Counter[str] = field(default_factory=Counter)
    split_ids: tuple[int, ...] = (701, 703)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/schemas/ids/{id}", self.by_id)
        app.router.add_get("/subjects/{subject}/versions/{version}", self.subject)
        return app

    @staticmethod
    def folder(schema_id: int) -> Path:
        major, minor = divmod(schema_id, 100)
        return SCHEMAS / str(major) / str(minor)

    async def by_id(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        schema_id = int(request.match_info["id"])
        folder = self.folder(schema_id)
        alert = sorted(folder.glob("*.alert.avsc")) if folder.is_dir() else []
        if not alert:
            return web.json_response(
                {"error_code": 40403, "message": "Schema not found"}, status=404
            )
        if schema_id not in self.split_ids:
            flat = to_parsing_canonical_form(load_schema(str(alert[0])))
            return web.json_response({"schema": flat})
        references = [
            {
                "name": p.name.removesuffix(".avsc"),
                "subject": p.name.removesuffix(".avsc"),
                "version": 1,
            }
            for p in sorted(folder.glob("*.avsc"))
            if p != alert[0]
        ]
        return web.json_response({"schema": alert[0].read_text(), "references": references})

    async def subject(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        name = request.match_info["subject"]
        found = sorted(SCHEMAS.rglob(f"{name}.avsc"))
        if not found:
            return web.json_response(
                {"error_code": 40401, "message": "Subject not found"}, status=404
            )
        return web.json_response(
            {"subject": name, "version": 1, "id": 1, "schema": found[0].read_text()}
        )


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    registry = Registry()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(registry.app())
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    registry.url = f"http://127.0.0.1:{port}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


# ------------------------------------------------------------------ ingestion helpers


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Client]:
    with local_cluster(workers=2) as client:
        yield client


def stream_config(
    test_environ: dict[str, str], kafka: str, tag: str, registry_url: str | None, **extra: str
) -> Config:
    env = {
        **test_environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "KOWALSKI__database__db": f"lsst_{tag}",
        "KOWALSKI__kafka__topics__ZTF": f"^ztf_[0-9]{{8}}_programid[123]_{tag}$",
        "KOWALSKI__kafka__topics__LSST": f"^lsst-alerts-v[0-9]+_{tag}$",
        "KOWALSKI__kafka__topics__DECAM": f"^decam_[0-9]{{8}}_{tag}$",
        "KOWALSKI__kafka__schema_registry_url": registry_url or "null",
        **extra,
    }
    return build_config([], env)


def produce(kafka: str, messages: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": kafka, "message.max.bytes": 10_485_760})
    for topic, value in messages:
        producer.produce(topic, value)
    assert producer.flush(60) == 0


def lsst_messages(paths: list[Path], tag: str) -> list[tuple[str, bytes]]:
    return [(topic_for(m, LSST, f"_{tag}"), m) for path in paths for m in framed(path)]


def ingest(cfg: Config, client: Client, kafka: str, tag: str) -> Ingester:
    ingester = Ingester(cfg, client, kafka, INGEST_SURVEYS, group=f"g-{tag}-{uuid.uuid4().hex[:6]}")
    ingester.run(until_idle=4.0)
    return ingester


def db_of(mongo_uri: str, cfg: Config) -> Any:
    return MongoClient(mongo_uri)[cfg.database.db]


MAG_FILTER = [
    {"$match": {"candidate.magpsf": {"$lt": 24}}},
    {"$project": {"candid": 1, "objectId": 1}},
]


@dataclass
class Ingested:
    cfg: Config
    ingester: Ingester
    db: Any
    gaia_position: tuple[float, float]


@pytest.fixture(scope="module")
def ingested(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    dask_client: Client,
    registry: Registry,
) -> Ingested:
    """Every bundled LSST file (Confluent-framed, the container's records framed one per message)
    and the DECam packet through Kafka, with the registry up, a filter on LSST_alerts and one
    catalog source 1" from a real LSST alert."""
    tag = uuid.uuid4().hex[:8]
    cfg = stream_config(test_environ, kafka_bootstrap, tag, registry.url)
    db = db_of(mongo_uri, cfg)
    source = raw_records(WITH_CUTOUTS)[0]["diaSource"]
    db.Gaia_EDR3.insert_one(
        {
            "_id": 7,
            "phot_g_mean_mag": 19.5,
            "coordinates": coordinates_block(source["ra"], source["dec"] + 1 / 3600),
        }
    )
    db.Gaia_EDR3.create_index([("coordinates.radec_geojson", "2dsphere")])
    db.filters.insert_one(
        filter_document(
            11, MAG_FILTER, group_id=1, catalog="LSST_alerts", permissions=[], fid="lsst01"
        )
    )
    decam = DATA / "decam_alerts" / "decam_desirt_v0_1_0.avro"
    messages = lsst_messages(lsst_files(), tag)
    messages.append(
        (topic_for(decam.read_bytes(), SURVEYS["DECAM"], f"_{tag}"), decam.read_bytes())
    )
    assert len(messages) == 16  # 3 + 10 + 2 LSST messages, 1 DECam
    produce(kafka_bootstrap, messages)
    ingester = ingest(cfg, dask_client, kafka_bootstrap, tag)
    return Ingested(cfg, ingester, db, (source["ra"], source["dec"]))


# ------------------------------------------------------------------ the stream


def test_exact_counts_per_collection(ingested: Ingested) -> None:
    db = ingested.db
    counts = {
        name: db[name].count_documents({})
        for name in (
            "LSST_alerts",
            "LSST_alerts_aux",
            "DECAM_alerts",
            "DECAM_alerts_aux",
            "dead_letters",
        )
    }
    # 15 LSST messages, 14 distinct diaSources (the example alert is in 9.0 and 11.1) on 14 objects
    assert counts == {
        "LSST_alerts": 14,
        "LSST_alerts_aux": 14,
        "DECAM_alerts": 1,
        "DECAM_alerts_aux": 1,
        "dead_letters": 0,
    }
    # the two copies of the example alert may be in flight in concurrent batches (two topics):
    # the unique candid index keeps one; the report's duplicate count is not asserted for that
    assert ingested.ingester.committed == 16
    # which of the two copies of the example alert is kept depends on topic interleaving
    assert (
        {"7.1", "7.3", "9.0"}
        <= set(db.LSST_alerts.distinct("schemavsn"))
        <= {
            "7.1",
            "7.3",
            "9.0",
            "11.1",
        }
    )


def test_registry_asked_once_per_id(ingested: Ingested, registry: Registry) -> None:
    # (other tests of this module may have asked for other ids, e.g. the unknown 999)
    assert {i: registry.requests[f"/schemas/ids/{i}"] for i in (701, 703, 900, 1101)} == {
        701: 1,
        703: 1,
        900: 1,
        1101: 1,
    }
    # the split schemas' referenced subjects were fetched once each too
    subjects = {p: n for p, n in registry.requests.items() if p.startswith("/subjects/")}
    assert subjects and set(subjects.values()) == {1}


def test_magnitudes_match_an_independent_computation(ingested: Ingested) -> None:
    """AB magnitudes from nJy fluxes via astropy units (zero point 3631 Jy, i.e. 31.40004 for
    nJy against the documented 31.4, hence the 1e-4 tolerance), jd from midpointMjdTai."""
    checked = 0
    for path in lsst_files():
        for record in raw_records(path):
            source = record["diaSource"]
            doc = ingested.db.LSST_alerts.find_one({"candid": source["diaSourceId"]})
            assert doc is not None
            cand = doc["candidate"]
            flux, err = source["psfFlux"], source["psfFluxErr"]
            expected = (abs(flux) * u.nJy).to(u.ABmag).value
            assert cand["magpsf"] == pytest.approx(expected, abs=1e-4)
            assert cand["sigmapsf"] == pytest.approx(2.5 / np.log(10) * err / abs(flux), rel=1e-9)
            assert cand["isdiffpos"] is (flux > 0)
            assert cand["jd"] == pytest.approx(source["midpointMjdTai"] + 2400000.5, abs=1e-9)
            assert doc["coordinates"]["radec_geojson"]["coordinates"] == pytest.approx(
                [source["ra"] - 180, source["dec"]]
            )
            assert doc["coordinates"]["radec_str"][0].count(":") == 2
            checked += 1
    assert checked == 15
    # the v9.0 alert has a negative psfFlux (a fading source): magnitude of |f|, isdiffpos false
    fading = ingested.db.LSST_alerts.find_one({"candid": 7912941781254298})
    assert fading["candidate"]["isdiffpos"] is False and fading["candidate"]["psfFlux"] < 0


def test_alert_and_aux_documents(ingested: Ingested) -> None:
    db = ingested.db
    record = raw_records(WITH_CUTOUTS)[0]
    alert = db.LSST_alerts.find_one({"candid": 25409136044802067})
    assert alert["objectId"] == record["diaSource"]["diaObjectId"] == 25401295582003262
    assert alert["schemavsn"] == "7.1" and alert["publisher"] == "LSST"
    assert bytes(alert["cutoutScience"]) == record["cutoutScience"]
    assert "prvDiaSources" not in alert and "diaObject" not in alert
    aux = db.LSST_alerts_aux.find_one({"_id": 25401295582003262})
    # 2 prvDiaSources + the alert's own diaSource, 3 prvDiaForcedSources with magnitudes
    assert [p["diaSourceId"] for p in aux["prv_candidates"]] == [
        *(p["diaSourceId"] for p in record["prvDiaSources"]),
        25409136044802067,
    ]
    assert len(aux["fp_hists"]) == 3
    for point, raw in zip(aux["fp_hists"], record["prvDiaForcedSources"], strict=True):
        assert point["diaForcedSourceId"] == raw["diaForcedSourceId"]
        assert point["magpsf"] == pytest.approx(
            (abs(raw["psfFlux"]) * u.nJy).to(u.ABmag).value, abs=1e-4
        )
    assert aux["diaObject"]["diaObjectId"] == 25401295582003262
    # catalog cross-match from config (the LSST entry reuses ZTF's catalogs): the source 1" away
    assert set(aux["cross_matches"]) == set(ingested.cfg.database.xmatch["LSST"])
    assert [m["_id"] for m in aux["cross_matches"]["Gaia_EDR3"]] == [7]
    # Rubin's example alert: diaSource without diaObjectId, keyed by its diaObject
    example = db.LSST_alerts.find_one({"candid": 281323062375219200})
    assert example["objectId"] == 281323062375219201
    decam = db.DECAM_alerts.find_one({})
    assert decam["candidate"]["jd"] == pytest.approx(decam["candidate"]["mjd"] + 2400000.5)
    assert decam["candidate"]["magpsf"] == pytest.approx(decam["candidate"]["forcediffimmag"])


def test_filter_on_lsst_alerts_passes_exactly_the_expected_alerts(ingested: Ingested) -> None:
    db = ingested.db
    expected = {
        r["diaSource"]["diaSourceId"]
        for path in lsst_files()
        for r in raw_records(path)
        if (abs(r["diaSource"]["psfFlux"]) * u.nJy).to(u.ABmag).value < 24 - 1e-3
    }
    runs = list(db.filter_runs.find({"filter_id": 11}))
    assert {c for run in runs for c in run["passed"]} == expected and expected
    assert {c for run in runs for c in run["candids"]} == set(db.LSST_alerts.distinct("candid"))


# ------------------------------------------------------------------ history, registry, dead letters


def test_history_merged_without_duplicates_in_any_order(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, dask_client: Client
) -> None:
    """The 10 v7.1 alerts in two different orders (batches of 3): the same aux documents, and
    no diaSourceId twice in any history. Without a registry: the bundled schemas decode."""
    messages = framed(CONTAINER)
    orders = [messages, [messages[i] for i in (7, 2, 9, 0, 5, 3, 8, 1, 6, 4)]]
    histories = []
    for order in orders:
        tag = uuid.uuid4().hex[:8]
        cfg = stream_config(
            test_environ, kafka_bootstrap, tag, None, KOWALSKI__ingester__batch_size="3"
        )
        produce(kafka_bootstrap, [(f"lsst-alerts-v7_{tag}", m) for m in order])
        ingest(cfg, dask_client, kafka_bootstrap, tag)
        db = db_of(mongo_uri, cfg)
        assert db.LSST_alerts.count_documents({}) == 10
        docs = {d["_id"]: d for d in db.LSST_alerts_aux.find({}, {"_rev": 0})}
        assert len(docs) == 10
        for doc in docs.values():
            ids = [p["diaSourceId"] for p in doc["prv_candidates"]]
            assert len(ids) == len(set(ids))
        histories.append(docs)
    # compared as Extended JSON: Rubin's packets carry NaNs, and nan != nan
    assert json_util.dumps(histories[0], sort_keys=True) == json_util.dumps(
        histories[1], sort_keys=True
    )
    assert [p["diaSourceId"] for p in histories[0][25404856109891600]["prv_candidates"]] == [
        25404856109891600,
        25409136044802059,
    ]
    # the merge itself: an alert's history merged with a re-delivery of part of it is unchanged
    parts = split_lsst(LSST, {**raw_records(WITH_CUTOUTS)[0], "schemavsn": "7.1"})
    prv = parts.prv_candidates
    assert merge_prv_candidates(prv, [prv[2], prv[0]], LSST.history_key) == prv


def test_registry_down_uses_the_bundled_schemas(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, dask_client: Client
) -> None:
    tag = uuid.uuid4().hex[:8]
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = stream_config(test_environ, kafka_bootstrap, tag, down)
    real = [p for p in lsst_files() if not p.name.startswith(("fake", "schema_"))]
    produce(kafka_bootstrap, lsst_messages(real, tag))
    ingest(cfg, dask_client, kafka_bootstrap, tag)
    db = db_of(mongo_uri, cfg)
    assert db.LSST_alerts.count_documents({}) == 3
    assert db.dead_letters.count_documents({}) == 0


def test_unknown_schema_id_and_truncated_packet_are_dead_lettered(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    dask_client: Client,
    registry: Registry,
) -> None:
    tag = uuid.uuid4().hex[:8]
    cfg = stream_config(test_environ, kafka_bootstrap, tag, registry.url)
    good = WITH_CUTOUTS.read_bytes()
    unknown = b"\x00" + (999).to_bytes(4, "big") + good[5:]
    truncated = good[:5000]
    ztf = ZTF_PACKET.read_bytes()  # a ZTF container on the LSST topic
    produce(
        kafka_bootstrap,
        [(f"lsst-alerts-v7_{tag}", v) for v in (unknown, truncated, b"\x00\x00", ztf, good)],
    )
    ingest(cfg, dask_client, kafka_bootstrap, tag)
    db = db_of(mongo_uri, cfg)
    assert db.LSST_alerts.count_documents({}) == 1
    dead = {bytes(d["packet"]): d["error"] for d in db.dead_letters.find()}
    assert set(dead) == {unknown, truncated, b"\x00\x00", ztf}
    assert "Rubin version" in dead[ztf]
    assert "unknown schema id 999" in dead[unknown]
    assert "truncated" in dead[truncated] and "701" in dead[truncated]
    assert "Confluent" in dead[b"\x00\x00"]
    assert registry.requests["/schemas/ids/999"] == 1


# ------------------------------------------------------------------ cross-survey aliases


def lsst_at(path: Path, ra: float, dec: float) -> bytes:
    """A real LSST alert moved onto (ra, dec): a test copy; only diaSource.ra/dec change."""
    schema_id = int.from_bytes(path.read_bytes()[1:5], "big")
    record = raw_records(path)[0]
    record["diaSource"] = {**record["diaSource"], "ra": ra, "dec": dec}
    return frame_confluent(schema_id, record, rubin_schema(schema_id))


@pytest.mark.parametrize("lsst_first", [False, True])
def test_alias_created_in_either_order(
    test_environ: dict[str, str],
    kafka_bootstrap: str,
    mongo_uri: str,
    dask_client: Client,
    lsst_first: bool,
) -> None:
    """A real ZTF alert, and the real LSST v7.1 alert 25409136044802067 moved (test copy) to 0.5"
    from the ZTF position; Rubin's v7.3 alert moved 3" away (outside 1.5") stays unlinked. The
    same with the real DECam alert and the LSST v9.0 alert moved (test copy) 1" from it."""
    tag = uuid.uuid4().hex[:8]
    cfg = stream_config(test_environ, kafka_bootstrap, tag, None)
    ztf = ZTF_PACKET.read_bytes()
    cand = decode_packet(ztf)[0]["candidate"]
    near = lsst_at(WITH_CUTOUTS, cand["ra"], cand["dec"] + 0.5 / 3600)
    far = lsst_at(
        LSST_ALERTS / "3527242430321524769.v7_3.confluent.avro", cand["ra"], cand["dec"] + 3 / 3600
    )
    decam = (DATA / "decam_alerts" / "decam_desirt_v0_1_0.avro").read_bytes()
    decam_cand = decode_packet(decam)[0]["candidate"]
    near_decam = lsst_at(
        LSST_ALERTS / "7912941781254298.v9_0.confluent.avro",
        decam_cand["ra"] + 1 / 3600 / math.cos(math.radians(decam_cand["dec"])),
        decam_cand["dec"],
    )
    others = [
        (f"ztf_20200202_programid{cand['programid']}_{tag}", ztf),
        (topic_for(decam, SURVEYS["DECAM"], f"_{tag}"), decam),
    ]
    lsst = [
        (f"lsst-alerts-v7_{tag}", near),
        (f"lsst-alerts-v7_{tag}", far),
        (f"lsst-alerts-v9_{tag}", near_decam),
    ]
    for batch in [lsst, others] if lsst_first else [others, lsst]:
        produce(kafka_bootstrap, batch)
        ingest(cfg, dask_client, kafka_bootstrap, tag)
    db = db_of(mongo_uri, cfg)
    assert db.LSST_alerts.count_documents({}) == 3 and db.ZTF_alerts.count_documents({}) == 1
    assert db.LSST_alerts_aux.find_one({"_id": 25401295582003262})["aliases"] == {
        "ZTF": ["ZTF20aajcbhr"]
    }
    assert db.ZTF_alerts_aux.find_one({"_id": "ZTF20aajcbhr"})["aliases"] == {
        "LSST": [25401295582003262]
    }
    assert "aliases" not in db.LSST_alerts_aux.find_one({"_id": 3527242430321524769})
    decam_id = decode_packet(decam)[0]["objectId"]
    assert db.LSST_alerts_aux.find_one({"_id": 7912941781254298})["aliases"] == {
        "DECAM": [decam_id]
    }
    assert db.DECAM_alerts_aux.find_one({"_id": decam_id})["aliases"] == {
        "LSST": [7912941781254298]
    }


# ------------------------------------------------------------------ API through penquins


@pytest.fixture(scope="module")
def api(
    ingested: Ingested, test_environ: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = {**test_environ, "KOWALSKI__database__db": ingested.cfg.database.db}
    port = free_port()
    server = ApiServer(
        ingested.cfg, port, tmp_path_factory.mktemp("api") / "gunicorn.log", env, workers=1
    ).start()
    try:
        yield server.url
    finally:
        server.stop()


def penquins_client(url: str, username: str = "admin", password: str = "admin") -> Any:
    from penquins import Kowalski

    port = int(url.rsplit(":", 1)[1])
    return Kowalski(
        username=username,
        password=password,
        protocol="http",
        host="127.0.0.1",
        port=port,
        timeout=30,
    )


def test_api_queries_on_lsst_through_penquins(api: str, ingested: Ingested) -> None:
    k = penquins_client(api)
    names = k.query({"query_type": "info", "query": {"command": "catalog_names"}})["default"][
        "data"
    ]
    assert {"LSST_alerts", "LSST_alerts_aux", "DECAM_alerts"} <= set(names)
    found = k.query(
        {
            "query_type": "find",
            "query": {
                "catalog": "LSST_alerts",
                "filter": {"objectId": 25401295582003262},
                "projection": {"_id": 0, "candid": 1, "candidate.magpsf": 1},
            },
        }
    )["default"]["data"]
    assert [d["candid"] for d in found] == [25409136044802067]
    ra, dec = ingested.gaia_position
    cone = k.query(
        {
            "query_type": "cone_search",
            "query": {
                "object_coordinates": {
                    "cone_search_radius": 2,
                    "cone_search_unit": "arcsec",
                    "radec": {"t": [ra, dec]},
                },
                "catalogs": {"LSST_alerts": {"filter": {}, "projection": {"_id": 0, "candid": 1}}},
            },
        }
    )["default"]["data"]
    assert [d["candid"] for d in cone["LSST_alerts"]["t"]] == [25409136044802067]
    count = k.query(
        {"query_type": "count_documents", "query": {"catalog": "LSST_alerts", "filter": {}}}
    )
    assert count["default"]["data"] == 14


def test_api_cutouts_and_classifications_on_lsst(api: str, ingested: Ingested) -> None:
    k = penquins_client(api)
    session, headers = k.instances["default"]["methods"]["get"], k.instances["default"]["headers"]
    record = raw_records(WITH_CUTOUTS)[0]
    for cutout in ("science", "template", "difference"):
        png = session(f"{api}/api/cutouts/lsst/25409136044802067/{cutout}/png", headers=headers)
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        got = session(f"{api}/api/cutouts/lsst/25409136044802067/{cutout}/fits", headers=headers)
        assert got.status_code == 200, got.text
        with (
            fits.open(io.BytesIO(got.content)) as served,
            fits.open(io.BytesIO(record[f"cutout{cutout.title()}"])) as original,
        ):
            # Rubin cutouts: float32 nJy, not gzipped, north-up as stored (no flip)
            assert (
                original[0].data.dtype == np.dtype(">f4") and original[0].header["BUNIT"] == "nJy"
            )
            np.testing.assert_array_equal(served[0].data, original[0].data.astype(np.float64))
    missing = session(f"{api}/api/cutouts/lsst/1/science/png", headers=headers)
    assert missing.status_code == 404
    # LSST is world-public: a user without any programid sees its cutouts
    made = k.api(
        "post",
        "/api/users",
        {"username": "rubin", "password": "rubin-pw", "permissions": {"ZTF": [1]}},
    )
    assert made["status"] == "success", made
    public = penquins_client(api, "rubin", "rubin-pw")
    png = public.instances["default"]["methods"]["get"](
        f"{api}/api/cutouts/lsst/25409136044802067/science/png",
        headers=public.instances["default"]["headers"],
    )
    assert png.status_code == 200
    put = k.api(
        "put", "/api/classifications/lsst", {"25409136044802067": {"human_labels": {"sn": 1.0}}}
    )
    assert put["status"] == "success", put
    got = k.api("get", "/api/classifications/lsst/25409136044802067")
    assert got["data"] == {
        "candid": 25409136044802067,
        "objectId": 25401295582003262,
        "human_labels": {"sn": 1.0},
        "ml_scores": {},
    }


def test_solar_system_source_without_dia_object_is_keyed_by_ss_object_id() -> None:
    """Rubin's example alert (11.1) turned into a solar-system detection (test copy: diaObject
    removed, diaSource.ssObjectId set): its objectId is the ssObjectId."""
    data = (LSST_ALERTS / "fake_alert_packet.lsst.v11_1.confluent.avro").read_bytes()
    record = cast(Doc, fastavro.schemaless_reader(io.BytesIO(data[5:]), rubin_schema(1101), None))
    record = {
        **record,
        "diaObject": None,
        "diaSource": {**record["diaSource"], "diaObjectId": None, "ssObjectId": 7777},
        "schemavsn": "11.1",
    }
    parts = split_lsst(LSST, record)
    assert parts.alert["objectId"] == 7777 and "diaObject" not in parts.latest
    assert LSST.topic(parts.alert) == "lsst-alerts-v11"
