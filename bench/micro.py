"""Micro benchmarks: `./kowalski.py bench --micro [--rounds N] [--out FILE]`.

Every claim is a ratio measured within one run on the same machine and the same data (the 38 real
ZTF packets in data/ztf_alerts; cross-match catalogs are SYNTHETIC, generated around the alert
positions). Absolute numbers depend on the machine and, with the embedded SecantusDB, mostly on the
database, so stage times are reported separately for the database-bound and the CPU-bound stages.

- decode: cached-schema decoder vs fastavro.reader per packet (upstream's way)
- ml: micro-batched inference vs one call per alert, both on ONNX Runtime (upstream ran
  TensorFlow per alert, which is not installed here; see data/models/README.md for its timings)
- pipeline: whole batches vs one alert at a time through the same stages (dedup, ML, history,
  cross-match, storage, filters)
- cone_search API: N objects x M catalogs, batched `$or` queries (this API) vs one query per object
  and catalog, one after another (upstream)
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import fastavro

from ingester.decode import decode_packet
from ingester.ml import load_models, score_batch
from ingester.pipeline import BatchReport, Packet, Pipeline
from kowalski.config import CONFIGURED, ROOT, Config, build_config, user_files
from kowalski.connectivity import one_line_errors, require_database
from kowalski.db import async_client, sync_client
from kowalski.services.mongo import EmbeddedMongo
from kowalski.services.process import free_port
from kowalski.surveys import SURVEYS
from ops.catalogs.ingest import Columns, frame_chunks, ingest_chunks
from ops.catalogs.synthetic import generate

PACKETS = sorted((ROOT / "data" / "ztf_alerts").rglob("*.avro"))
DB_STAGES = ("dedup", "aux", "store", "filters")
CPU_STAGES = ("decode", "ml", "mongify")


def timed(fn: Any, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_decode(packets: list[bytes], repeat: int) -> dict[str, float]:
    ours = timed(lambda: [decode_packet(p) for p in packets], repeat)
    upstream = timed(lambda: [list(fastavro.reader(io.BytesIO(p))) for p in packets], repeat)
    n = len(packets)
    return {
        "ours_ms_per_alert": ours / n * 1e3,
        "fastavro_reader_ms_per_alert": upstream / n * 1e3,
        "speedup": upstream / ours,
    }


def bench_ml(cfg: Config, packets: list[bytes]) -> dict[str, float]:
    models = load_models(cfg, "ZTF")
    alerts = [decode_packet(p)[0] for p in packets]
    score_batch(models, alerts[:2])  # warm up sessions
    batched = timed(lambda: score_batch(models, alerts))
    single = timed(lambda: [score_batch(models, [a]) for a in alerts])
    n = len(alerts)
    return {
        "batched_ms_per_alert": batched / n * 1e3,
        "per_alert_ms_per_alert": single / n * 1e3,
        "speedup": single / batched,
    }


def prepare_db(cfg: Config) -> None:
    """Synthetic cross-match catalogs around the real alert positions, and three filters."""
    with sync_client(cfg) as client:
        db = client[cfg.database.db]
        client.drop_database(cfg.database.db)
        for i, packet in enumerate(PACKETS):
            cand = decode_packet(packet.read_bytes())[0]["candidate"]
            for catalog in ("Gaia_EDR3", "AllWISE"):
                frame = generate(20000, center=(cand["ra"], cand["dec"]), radius_deg=0.02, seed=i)
                frame["id"] = frame["id"] + i * 1_000_000
                ingest_chunks(
                    db,
                    catalog,
                    frame_chunks(frame, 4096),
                    Columns("ra", "dec", "id", int),
                    f"bench:{i}",
                    progress=False,
                )
        pipeline = json.dumps(
            [{"$match": {"candidate.drb": {"$gt": 0.5}}}, {"$project": {"candid": 1}}]
        )
        db.filters.insert_many(
            [
                {
                    "filter_id": k,
                    "group_id": 1,
                    "catalog": "ZTF_alerts",
                    "permissions": [1, 2, 3],
                    "active": True,
                    "active_fid": "bench0",
                    "fv": [{"fid": "bench0", "pipeline": pipeline}],
                    "autosave": False,
                    "auto_followup": {},
                }
                for k in (1, 2, 3)
            ]
        )


async def run_pipeline(cfg: Config, batch_size: int, rounds: int) -> BatchReport:
    client = async_client(cfg)
    total = BatchReport()
    try:
        db = client[cfg.database.db]
        pipeline = Pipeline(cfg, db, {"ZTF": load_models(cfg, "ZTF")})
        for _ in range(rounds):
            for name in ("ZTF_alerts", "ZTF_alerts_aux", "filter_runs"):
                await db[name].drop()
            from kowalski.db import ensure_indexes

            await ensure_indexes(db, cfg, "ZTF_alerts")
            packets = [Packet("bench", 0, i, p.read_bytes()) for i, p in enumerate(PACKETS)]
            for start in range(0, len(packets), batch_size):
                total.add(
                    await pipeline.process(SURVEYS["ZTF"], packets[start : start + batch_size])
                )
    finally:
        await client.close()
    return total


def bench_pipeline(cfg: Config, rounds: int) -> dict[str, Any]:
    asyncio.run(run_pipeline(cfg, len(PACKETS), 1))  # warm up models and caches
    out: dict[str, Any] = {}
    for label, size in (("batched", len(PACKETS)), ("per_alert", 1)):
        start = time.perf_counter()
        report = asyncio.run(run_pipeline(cfg, size, rounds))
        wall = time.perf_counter() - start
        assert report.stored == rounds * len(PACKETS), report
        out[label] = {
            "alerts_per_s": report.stored / wall,
            "db_stage_s": round(sum(report.seconds.get(s, 0.0) for s in DB_STAGES), 3),
            "cpu_stage_s": round(sum(report.seconds.get(s, 0.0) for s in CPU_STAGES), 3),
            "stages_s": {k: round(v, 3) for k, v in report.seconds.items()},
        }
    out["speedup"] = out["batched"]["alerts_per_s"] / out["per_alert"]["alerts_per_s"]
    out["cpu_speedup"] = out["per_alert"]["cpu_stage_s"] / max(out["batched"]["cpu_stage_s"], 1e-9)
    out["db_speedup"] = out["per_alert"]["db_stage_s"] / max(out["batched"]["db_stage_s"], 1e-9)
    return out


async def bench_cone(cfg: Config) -> dict[str, float]:
    """The API's batched cone search vs one query per object and catalog in sequence (upstream)."""
    from aiohttp.test_utils import TestClient, TestServer

    import api.queries as queries
    from api.app import app_factory
    from api.queries import CONE_CONCURRENCY

    async with TestClient(TestServer(await app_factory(cfg))) as client:
        auth = await client.post("/api/auth", json={"username": "admin", "password": "admin"})
        headers = {"Authorization": (await auth.json())["token"]}
        radec = {}
        for i, packet in enumerate(PACKETS):
            cand = decode_packet(packet.read_bytes())[0]["candidate"]
            radec[f"o{i}"] = [cand["ra"], cand["dec"]]
        body = {
            "query_type": "cone_search",
            "query": {
                "object_coordinates": {
                    "cone_search_radius": 3,
                    "cone_search_unit": "arcsec",
                    "radec": radec,
                },
                "catalogs": {
                    c: {"projection": {"_id": 1}} for c in ("Gaia_EDR3", "AllWISE", "ZTF_alerts")
                },
            },
        }

        async def once(request: dict[str, Any]) -> float:
            start = time.perf_counter()
            response = await client.post("/api/queries", json=request, headers=headers)
            assert response.status == 200, await response.text()
            await response.read()
            return time.perf_counter() - start

        await once(body)
        batched = min([await once(body) for _ in range(3)])
        # upstream: one find per object per catalog, one after another (a per-object `limit`
        # makes this API take that path too, so both sides run the same server code otherwise)
        per_object = {**body, "kwargs": {"limit": 100000}}
        queries.CONE_CONCURRENCY = 1
        try:
            sequential = min([await once(per_object) for _ in range(3)])
        finally:
            queries.CONE_CONCURRENCY = CONE_CONCURRENCY
    return {
        "objects_x_catalogs": len(radec) * 3,
        "batched_s": batched,
        "per_object_sequential_s": sequential,
        "speedup": sequential / batched,
    }


def run_micro(rounds: int, out: Path) -> int:
    """Run every micro benchmark; print the table and write the JSON to `out`."""
    # the database: MONGODB_URI, else the running `up --local` instance, else one of its own
    server = None
    env = {**os.environ, "KOWALSKI__database__db": "kowalski_bench"}
    env["KOWALSKI__server__insecure_dev"] = "true"  # logs in as admin/admin
    cfg = build_config(user_files(), env)
    if cfg.origin("database") == CONFIGURED["database"]:
        server = EmbeddedMongo(
            Path(tempfile.mkdtemp(prefix="kowalski-bench-")) / "db", free_port()
        ).start()
        cfg = build_config(user_files(), {**env, "MONGODB_URI": server.uri})
    try:
        with one_line_errors(cfg):
            require_database(cfg)
            results = run_all(
                cfg, rounds, "embedded SecantusDB" if server else cfg.origin("database")
            )
    finally:
        if server:
            server.stop()
    report(results, out)
    return 0


def run_all(cfg: Config, rounds: int, database: str) -> dict[str, Any]:
    packets = [p.read_bytes() for p in PACKETS]
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "database": database}}
    print(f"database: {database}", flush=True)
    print("decode ...", flush=True)
    results["decode"] = bench_decode(packets, repeat=5)
    print("ml ...", flush=True)
    results["ml"] = bench_ml(cfg, packets)
    print("preparing synthetic catalogs and filters ...", flush=True)
    prepare_db(cfg)
    print("pipeline ...", flush=True)
    results["pipeline"] = bench_pipeline(cfg, rounds)
    print("cone_search API ...", flush=True)
    results["cone_search"] = asyncio.run(bench_cone(cfg))
    return results


def report(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print(f"{'what':<22}{'this project':>16}{'upstream way':>16}{'ratio':>9}")
    rows = [
        (
            "decode ms/alert",
            results["decode"]["ours_ms_per_alert"],
            results["decode"]["fastavro_reader_ms_per_alert"],
            results["decode"]["speedup"],
        ),
        (
            "ML ms/alert",
            results["ml"]["batched_ms_per_alert"],
            results["ml"]["per_alert_ms_per_alert"],
            results["ml"]["speedup"],
        ),
        (
            "pipeline alerts/s",
            results["pipeline"]["batched"]["alerts_per_s"],
            results["pipeline"]["per_alert"]["alerts_per_s"],
            results["pipeline"]["speedup"],
        ),
        (
            "  CPU stages s",
            results["pipeline"]["batched"]["cpu_stage_s"],
            results["pipeline"]["per_alert"]["cpu_stage_s"],
            results["pipeline"]["cpu_speedup"],
        ),
        (
            "  DB stages s",
            results["pipeline"]["batched"]["db_stage_s"],
            results["pipeline"]["per_alert"]["db_stage_s"],
            results["pipeline"]["db_speedup"],
        ),
        (
            "cone_search s",
            results["cone_search"]["batched_s"],
            results["cone_search"]["per_object_sequential_s"],
            results["cone_search"]["speedup"],
        ),
    ]
    for name, ours, theirs, ratio in rows:
        print(f"{name:<22}{ours:>16.3f}{theirs:>16.3f}{ratio:>8.1f}x")
    print(f"\nfull results: {out}")
