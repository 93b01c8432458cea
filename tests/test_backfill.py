"""Filter back-fills over the archive, on the bundled real ZTF alerts: the same passes as the live
filter stage, a runner SIGKILLed half-way resumed with each pass once, data rights, limits and the
API (`POST/GET/DELETE /api/filters/{id}/backfill`)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient, MongoClient

from ingester import backfill as runner
from ingester.backfill_outputs import BACKFILL_HEADER
from ingester.decode import decode_packet
from ingester.ml import load_models
from ingester.pipeline import Packet, Pipeline
from kowalski import backfill, results
from kowalski.config import ROOT, Config, build_config
from kowalski.documents import Doc
from kowalski.surveys import SURVEYS
from kowalski.testing.filters import filter_document

from .apiclient import app_api, app_users
from .conftest import found, run_cli, ztf_alert_files
from .test_results import read_all

ALL_TIME = (2400000.5, 2500000.5)
# real thresholds on real fields: candidate values, ML scores, and the history the filter sees
BRIGHT = [
    {"$match": {"candidate.magpsf": {"$lt": 18.5}, "candidate.isdiffpos": {"$in": ["t", "1"]}}},
    {"$project": {"candid": 1, "objectId": 1, "mag": "$candidate.magpsf"}},
]
# at least 5 points known, none later than this detection: true for every alert as it arrived;
# with history gathered later (ZTF20aajcdad has a second alert 1 h after the first) it is not
LATER_POINTS = {
    "$filter": {"input": "$prv_candidates", "cond": {"$gt": ["$$this.jd", "$candidate.jd"]}}
}
WITH_HISTORY = [
    {
        "$addFields": {
            "n": {"$size": {"$ifNull": ["$prv_candidates", []]}},
            "later": {"$size": {"$ifNull": [LATER_POINTS, []]}},
        }
    },
    {"$match": {"n": {"$gte": 5}, "later": 0}},
    {"$project": {"candid": 1, "objectId": 1, "n": 1}},
]
EVERYTHING = [{"$match": {}}, {"$project": {"candid": 1, "programid": "$candidate.programid"}}]


def jd_of(path: Path) -> float:
    return float(decode_packet(path.read_bytes())[0]["candidate"]["jd"])


def environ_for(test_environ: dict[str, str], **settings: str) -> dict[str, str]:
    env = {**test_environ, "KOWALSKI__database__db": f"backfill_{uuid.uuid4().hex[:8]}"}
    return env | {f"KOWALSKI__backfill__{k}": v for k, v in settings.items()}


async def ingest_live(cfg: Config, db: Any) -> None:
    """The bundled alerts through the live pipeline one at a time in time order, as they would
    arrive, with the filters in place."""
    pipeline = Pipeline(cfg, db, {"ZTF": load_models(cfg, "ZTF")})
    for i, path in enumerate(sorted(ztf_alert_files(), key=jd_of)):
        report = await pipeline.process(SURVEYS["ZTF"], [Packet("t", 0, i, path.read_bytes())])
        assert report.stored == 1


async def run_all_jobs(db: Any, cfg: Config) -> int:
    """Every claimable job, run here until none is left."""
    return await runner.work(db, cfg, threading.Event(), until_idle=0)


async def passes_of(db: Any, job_id: str) -> set[int]:
    records = await db.filter_backfill_passes.find({"job_id": job_id, "state": "passed"}).to_list()
    return {r["candid"] for r in records}


async def test_backfill_passes_equal_the_live_passes(
    test_environ: dict[str, str], mongo: AsyncMongoClient[Doc]
) -> None:
    cfg = build_config([], environ_for(test_environ, batch_size="5"))
    db = mongo[cfg.database.db]
    await db.filters.insert_many(
        [filter_document(1, BRIGHT, fid="b1"), filter_document(2, WITH_HISTORY, fid="h1")]
    )
    await ingest_live(cfg, db)
    live: dict[int, set[int]] = {1: set(), 2: set()}
    async for run in db.filter_runs.find({}):
        assert run["fid"] == {1: "b1", 2: "h1"}[run["filter_id"]]  # live passes record fid
        live[run["filter_id"]] |= set(run["passed"])
    async for record in db.handoffs.find({"filters": {"$ne": []}}):
        assert all("fid" in f for f in record["filters"])
    assert live[1] and live[2] and live[1] != live[2]

    jobs = {}
    for filter_id in (1, 2):
        doc = found(await db.filters.find_one({"filter_id": filter_id}))
        jobs[filter_id] = await backfill.create_job(
            db, cfg, doc, owner="admin", admin=True, allowed=None, jd_range=ALL_TIME
        )
    assert await run_all_jobs(db, cfg) == 2
    scannable = await db.ZTF_alerts.count_documents({"candidate.programid": {"$in": [1, 2, 3]}})
    for filter_id, job in jobs.items():
        assert await passes_of(db, job["_id"]) == live[filter_id]
        done = backfill.status(found(await db.filter_backfills.find_one({"_id": job["_id"]})))
        assert done["state"] == "done" and done["progress"] == 1.0
        assert done["scanned"] == done["total"] == scannable
        assert done["passed"] == len(live[filter_id]) and done["failed"] == 0
        assert done["cost"]["batches"] == -(-scannable // 5) and done["cost"]["db_ms"] > 0
        assert done["started_at"] <= done["finished_at"] and done["cost"]["alerts_per_s"] > 0
        records = await db.filter_backfill_passes.find({"job_id": job["_id"]}).to_list()
        assert {r["fid"] for r in records} == {job["fid"]} and job["fid"] in ("b1", "h1")
    await mongo.drop_database(cfg.database.db)


async def wait_until_done(db: Any, job_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (await db.filter_backfills.find_one({"_id": job_id}))["state"] != "done":
        assert time.monotonic() < deadline, f"back-fill {job_id} not done"
        await asyncio.sleep(0.05)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_runner_killed_half_way_resumes_and_records_each_pass_once(
    test_environ: dict[str, str], mongo_uri: str, tmp_path: Path
) -> None:
    """A real `python -m ingester.backfill worker` is SIGKILLed after its first batches;
    `./kowalski.py backfill --job` takes the job over once the lease expired and finishes it:
    every pass is recorded once and the counters add up to one run over the archive."""
    env = environ_for(test_environ, batch_size="1", lease_s="2", poll_s="0.2")
    cfg = build_config([], env)
    client: MongoClient[Doc] = MongoClient(mongo_uri)
    db = client[cfg.database.db]
    from ingester.replay import ingest_files

    assert ingest_files(cfg, ztf_alert_files()) == {"ZTF": 38}
    db.filters.insert_one(filter_document(3, BRIGHT, fid="k1"))
    total = db.ZTF_alerts.count_documents({"candidate.programid": {"$in": [1, 2, 3]}})
    job_id = _queue(cfg, mongo_uri, 3)
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "ingester.backfill", "worker"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    jobs = db.filter_backfills
    try:
        wait_for(lambda: (jobs.find_one({"_id": job_id}) or {}).get("scanned", 0) >= 2, "2 batches")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(60)
    assert worker.returncode == -signal.SIGKILL
    killed = jobs.find_one({"_id": job_id}) or {}
    assert killed["state"] == "running" and killed["scanned"] < total  # died with work left
    resumed = run_cli("backfill", "--job", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"back-fill {job_id}: done, {total} alerts scanned" in resumed.stdout
    job = jobs.find_one({"_id": job_id}) or {}
    records = list(db.filter_backfill_passes.find({"job_id": job_id}))
    candids = [r["candid"] for r in records]
    assert len(candids) == len(set(candids)) == job["passed"] and job["scanned"] == total
    expected = {
        a["candid"]
        for a in db.ZTF_alerts.find(
            {
                "candidate.magpsf": {"$lt": 18.5},
                "candidate.isdiffpos": {"$in": ["t", "1"]},
                "candidate.programid": {"$in": [1, 2, 3]},
            }
        )
    }
    assert set(candids) == expected and expected
    assert job["batches"] == total  # no batch counted twice

    # a new job from the command line, run in the foreground with a progress bar
    fresh = run_cli("backfill", "3", "--start", "2018-01-01", "--end", "2024-01-01", env=env)
    assert fresh.returncode == 0, fresh.stderr
    assert "alert/s" in fresh.stderr and f"done, {total} alerts scanned" in fresh.stdout
    [second] = [j for j in jobs.find({"filter_id": 3}) if j["_id"] != job_id]
    again = {r["candid"] for r in db.filter_backfill_passes.find({"job_id": second["_id"]})}
    assert again == expected
    client.drop_database(cfg.database.db)
    client.close()


def _queue(cfg: Config, mongo_uri: str, filter_id: int) -> str:
    """A queued job of the filter over the whole archive (as admin)."""

    async def create() -> str:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri)
        try:
            db = client[cfg.database.db]
            doc = found(await db.filters.find_one({"filter_id": filter_id}))
            job = await backfill.create_job(
                db, cfg, doc, owner="admin", admin=True, allowed=None, jd_range=ALL_TIME
            )
            return str(job["_id"])
        finally:
            await client.close()

    return asyncio.run(create())


# ------------------------------------------------------------------ the API, data rights, limits


@pytest.fixture(scope="module")
def limited_cfg(test_environ: dict[str, str]) -> Config:
    from .apiclient import ingested_config

    env = {**test_environ, "KOWALSKI__backfill__max_alerts": "30"}
    env["KOWALSKI__backfill__max_jobs_per_user"] = "2"
    return ingested_config(env, "backfill_api")[0]


@pytest.fixture(scope="module")
async def limited_api(limited_cfg: Config, mongo_uri: str) -> Any:
    async for served in app_api(limited_cfg, mongo_uri):
        served.db.filters.insert_one(filter_document(5, EVERYTHING, permissions=[1, 2, 3]))
        yield served


@pytest.fixture(scope="module")
async def tokens(limited_api: Any) -> dict[str, str]:
    return await app_users(limited_api)


async def test_a_user_cannot_backfill_over_alerts_they_may_not_see(
    limited_api: Any, tokens: dict[str, str], mongo: AsyncMongoClient[Doc]
) -> None:
    api, cfg = limited_api, limited_api.cfg
    db = mongo[cfg.database.db]
    body = {"start": "2018-01-01", "end": "2024-01-01", "max_alerts": 30}
    r = await api.call("POST", "/api/filters/5/backfill", tokens["public"], json=body)
    assert r.status_code == 200, r.text
    public_job = r.json()["data"]
    assert public_job["permissions"] == [1] and public_job["state"] == "queued"
    r = await api.call("POST", "/api/filters/5/backfill", tokens["partner"], json=body)
    partner_job = r.json()["data"]
    assert partner_job["permissions"] == [1, 2]
    # run by the runner thread that `python -m ingester` starts
    thread = runner.BackfillThread(cfg).start()
    try:
        for job in (public_job, partner_job):
            await wait_until_done(db, job["job_id"])
    finally:
        thread.stop()

    in_order = db.ZTF_alerts.find({}).sort(backfill.TIME_ORDER)
    public = [a["candid"] async for a in in_order if a["candidate"]["programid"] == 1]
    assert await db.ZTF_alerts.count_documents({}) > len(public) > 30  # some are hidden
    # the first 30 alerts it may see, in time order (max_alerts): not one hidden alert
    assert await passes_of(db, public_job["job_id"]) == set(public[:30])
    r = await api.call(
        "GET", f"/api/filters/5/backfill?job_id={public_job['job_id']}", tokens["public"]
    )
    status = r.json()["data"]
    assert status["state"] == "done" and status["progress"] == 1.0
    assert status["scanned"] == 30 and status["total"] == len(public)
    assert set(status["cost"]) >= {"alerts_scanned", "db_ms", "elapsed_s", "alerts_per_s"}

    # the passes through /api/queries: each user reads only their own jobs' records
    query = {
        "query_type": "find",
        "query": {"catalog": "filter_backfill_passes", "filter": {}, "projection": {"owner": 1}},
    }
    mine = (await api.query(tokens["public"], query)).json()["data"]
    assert mine and {d["owner"] for d in mine} == {"public"}
    count = {
        "query_type": "count_documents",
        "query": {"catalog": "filter_backfill_passes", "filter": {}},
    }
    everyone = (await api.query(tokens["admin"], count)).json()["data"]
    assert (await api.query(tokens["public"], count)).json()["data"] == len(mine) < everyone
    jobs = {"query_type": "find", "query": {"catalog": "filter_backfills", "filter": {}}}
    assert (await api.query(tokens["public"], jobs)).status_code == 403
    listed = (await api.call("GET", "/api/filters/5/backfill", tokens["public"])).json()["data"]
    assert [j["owner"] for j in listed] == ["public"]


async def test_backfill_limits_cancel_and_validation(
    limited_api: Any, tokens: dict[str, str]
) -> None:
    api = limited_api
    body = {"start": 2458000.5, "end": 2460500.5}
    r = await api.call("POST", "/api/filters/5/backfill", tokens["partner"], json=body)
    assert r.status_code == 400 and "narrow the range or set max_alerts" in r.json()["message"]
    r = await api.call(
        "POST", "/api/filters/5/backfill", tokens["partner"], json={**body, "max_alerts": 31}
    )
    assert r.status_code == 400 and "at most 30" in r.json()["message"]
    admin = await api.call("POST", "/api/filters/5/backfill", tokens["admin"], json=body)
    assert admin.status_code == 200 and admin.json()["data"]["max_alerts"] is None  # no cap
    for _ in range(2):
        r = await api.call(
            "POST", "/api/filters/5/backfill", tokens["partner"], json={**body, "max_alerts": 3}
        )
        assert r.status_code == 200, r.text
    r = await api.call(
        "POST", "/api/filters/5/backfill", tokens["partner"], json={**body, "max_alerts": 3}
    )
    assert r.status_code == 429 and "max_jobs_per_user" in r.json()["message"]
    r = await api.call("DELETE", "/api/filters/5/backfill", tokens["partner"])
    assert r.status_code == 200 and r.json()["message"].startswith("cancelled 2 ")
    listed = (await api.call("GET", "/api/filters/5/backfill", tokens["admin"])).json()["data"]
    assert {j["state"] for j in listed if j["owner"] == "partner" and j["scanned"] == 0} == {
        "cancelled"
    }
    await api.call("DELETE", "/api/filters/5/backfill", tokens["admin"])
    for bad, message in (
        ({"start": "yesterday", "end": 2460000}, "start must be a JD or an ISO date"),
        ({"end": 2460000}, "start is required"),
        ({**body, "outputs": ["email"]}, "unknown outputs"),
        ({**body, "fid": "nope"}, "filter version fid nope not in filter.fv"),
        ({"start": 2460000, "end": 2459000}, "end must be after start"),
    ):
        r = await api.call("POST", "/api/filters/5/backfill", tokens["admin"], json=bad)
        assert r.status_code == 400 and message in r.json()["message"], r.text
    r = await api.call("POST", "/api/filters/99/backfill", tokens["admin"], json=body)
    assert r.status_code == 400 and r.json()["message"] == "Filter id 99 not found"
    assert (await api.call("GET", "/api/filters/5/backfill")).status_code == 401


async def test_a_filter_failing_on_one_alert_is_recorded_failed_not_passed_nothing(
    limited_api: Any, mongo: AsyncMongoClient[Doc]
) -> None:
    """A real aggregation error on one alert only ($divide by zero where the candid is that
    alert's): the back-fill splits the batch down as the live stage does, records that alert
    failed with the error and every other alert's pass."""
    cfg = limited_api.cfg
    db = mongo[cfg.database.db]
    bad = int(ztf_alert_files()[5].stem)  # the file name is the alert's candid
    divisor = {"$cond": [{"$eq": ["$candid", bad]}, 0, 1]}
    pipeline = [{"$project": {"candid": 1, "x": {"$divide": [1, divisor]}}}]
    await db.filters.insert_one(filter_document(6, pipeline, fid="d1"))
    doc = found(await db.filters.find_one({"filter_id": 6}))
    job = await backfill.create_job(
        db, cfg, doc, owner="admin", admin=True, allowed=None, jd_range=ALL_TIME
    )
    await runner.run_claimed(db, cfg, found(await backfill.claim(db, cfg, "t", job["_id"])), "t")
    done = backfill.status(found(await db.filter_backfills.find_one({"_id": job["_id"]})))
    [failed] = await db.filter_backfill_passes.find(
        {"job_id": job["_id"], "state": "failed"}
    ).to_list()
    assert failed["candid"] == bad and "divide" in failed["error"].lower()
    assert done["state"] == "done" and done["failed"] == 1 and done["cost"]["retries"] > 0
    assert len(await passes_of(db, job["_id"])) == done["passed"] == done["scanned"] - 1


async def test_outputs_publish_to_the_results_stream_and_queue_to_skyportal(
    test_environ: dict[str, str], mongo: AsyncMongoClient[Doc], kafka_bootstrap: str
) -> None:
    """`outputs: ["results", "skyportal"]`: every pass of the job is published once to the
    filter's results topic, marked with the job's id, and handed to the broker feed's stage
    (queued in the SkyPortal outbox, as a live pass is); without the broker, the SkyPortal
    output is refused when the job is created."""
    tag = uuid.uuid4().hex[:8]
    env = environ_for(test_environ, batch_size="7") | {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KOWALSKI__kafka__results_topic": f"kowalski_backfill_{{filter_id}}_{tag}",
        "KOWALSKI__misc__broker": "true",
        "KOWALSKI__skyportal__token": "test-token",
    }
    cfg = build_config([], env)
    db = mongo[cfg.database.db]
    await db.filters.insert_one(filter_document(5, BRIGHT, fid="o1", stream={"lightcurve": True}))
    await ingest_live(build_config([], env | {"KOWALSKI__misc__broker": "false"}), db)
    await db.filter_runs.delete_many({})
    doc = found(await db.filters.find_one({"filter_id": 5}))
    job = await backfill.create_job(
        db,
        cfg,
        doc,
        owner="admin",
        admin=True,
        allowed=None,
        jd_range=ALL_TIME,
        outputs=["results", "skyportal"],
    )
    assert await run_all_jobs(db, cfg) == 1
    passes = await passes_of(db, job["_id"])
    assert passes
    published = read_all(kafka_bootstrap, results.topic_for(cfg, 5, "ZTF"))
    assert sorted(p.record["candid"] for p in published) == sorted(passes)  # each once
    assert {p.headers[BACKFILL_HEADER] for p in published} == {job["_id"]}
    assert all(p.record["fid"] == "o1" and p.record["light_curve"] is not None for p in published)
    candidates = await db.skyportal_outbox.find({"kind": "candidate"}).to_list()
    assert candidates and all(c["body"]["filter_ids"] == [5] for c in candidates)
    assert {c["body"]["passing_alert_id"] for c in candidates} <= passes

    no_broker = build_config([], env | {"KOWALSKI__misc__broker": "false"})
    with pytest.raises(backfill.BackfillError, match=r"misc\.broker"):
        await backfill.create_job(
            db,
            no_broker,
            doc,
            owner="admin",
            admin=True,
            allowed=None,
            jd_range=ALL_TIME,
            outputs=["skyportal"],
        )
    await mongo.drop_database(cfg.database.db)


async def test_concurrent_requests_never_pass_the_per_user_limit(
    test_environ: dict[str, str], mongo: AsyncMongoClient[Doc]
) -> None:
    """Five back-fills asked at once by one user whose limit is 2: exactly 2 are created (the
    check and the insert were two steps, so all five used to pass); once one is cancelled, its
    slot serves the next request."""
    cfg = build_config([], environ_for(test_environ, max_jobs_per_user="2"))
    db = mongo[cfg.database.db]
    await db.filters.insert_one(filter_document(7, BRIGHT))
    doc = found(await db.filters.find_one({"filter_id": 7}))

    async def ask() -> Doc | BaseException:
        try:
            return await backfill.create_job(
                db, cfg, doc, owner="ann", admin=False, allowed=[1], jd_range=ALL_TIME
            )
        except backfill.TooManyJobs as exc:
            return exc

    answers = await asyncio.gather(*(ask() for _ in range(5)))
    created = [a for a in answers if isinstance(a, dict)]
    assert len(created) == 2, answers
    assert all(isinstance(a, backfill.TooManyJobs) for a in answers if not isinstance(a, dict))
    assert await db.filter_backfills.count_documents({"owner": "ann"}) == 2
    assert await backfill.cancel(db, cfg, {"_id": created[0]["_id"]}) == 1
    assert isinstance(await ask(), dict)
    assert isinstance(await ask(), backfill.TooManyJobs)
    await mongo.drop_database(cfg.database.db)
