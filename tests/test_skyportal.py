"""The broker feed to SkyPortal end to end: real packets through real Kafka, the ingester and the
real database, posted through the outbox to an in-test SkyPortal (tests/fake_skyportal.py)."""

from __future__ import annotations

import asyncio
import json
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
from distributed import Client
from prometheus_client import REGISTRY
from pymongo import MongoClient
from pymongo.database import Database

from ingester.consumer import Ingester
from ingester.decode import decode_packet
from ingester.replay import replay
from ingester.skyportal.delivery import DeliveryThread
from ingester.skyportal.outbox import format_status, status
from ingester.skyportal.stage import FeedFactory, FeedSetup, FeedSetupError, resolve_setup
from kowalski.config import ROOT, Config
from kowalski.testing.filters import filter_document

from .conftest import ZTF_ALERTS, found
from .fake_skyportal import TOKEN, FakeSkyPortal, Fault
from .test_ingestion import dask_client, night_config, stop_when_committed

__all__ = ["dask_client"]  # the module-scoped dask cluster fixture
NIGHT = ZTF_ALERTS / "20200202"
FP_PACKET = ZTF_ALERTS / "20231012" / "2475433850015015001.avro"  # ZTF23abjjnqm, forced phot.
REPEATED = ["1127495406315015005.avro", "1127536316315015004.avro"]  # ZTF20aajcdad twice
Doc = dict[str, Any]
BRIGHT: list[Doc] = [{"$match": {"candidate.drb": {"$gt": 0.9}}}]
FeedMaker = Callable[..., tuple[Config, Database[Doc]]]


@pytest.fixture
def skyportal() -> Iterator[FakeSkyPortal]:
    fake = FakeSkyPortal().start()
    fake.add_group(10, "Program A", {1: "bright", 3: "followup"})
    fake.add_group(20, "Program B", {2: "annotated", 4: "desc"})
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def feed(
    test_environ: dict[str, str], kafka_bootstrap: str, mongo_uri: str, skyportal: FakeSkyPortal
) -> Iterator[FeedMaker]:
    """Makes a feed test's configuration (a database of its own, `feed_config` settings plus
    `extra`) and that database."""
    client: MongoClient[Doc] = MongoClient(mongo_uri)

    def make(**extra: str) -> tuple[Config, Database[Doc]]:
        cfg = feed_config(test_environ, kafka_bootstrap, skyportal.port, **extra)
        return cfg, client[cfg.database.db]

    try:
        yield make
    finally:
        client.close()


def feed_config(environ: dict[str, str], kafka: str, port: int, **extra: str) -> Config:
    settings = {
        "KOWALSKI__misc__broker": "true",
        "KOWALSKI__skyportal__port": str(port),
        "SKYPORTAL_TOKEN": TOKEN,
        "KOWALSKI__skyportal__retries": "1",
        "KOWALSKI__skyportal__backoff_s": "0.05",
        "KOWALSKI__skyportal__max_backoff_s": "0.5",
        "KOWALSKI__skyportal__poll_s": "0.1",
        "KOWALSKI__skyportal__followup_timeout_s": "3",
        "KOWALSKI__skyportal__photometry_timeout_s": "5",
        **extra,
    }
    return night_config(environ, kafka, uuid.uuid4().hex[:8], **settings)


def tag_of(cfg: Config) -> str:
    return cfg.database.db.removeprefix("ingest_")


def add_filter(db: Any, filter_id: int, group_id: int, pipeline: list[Doc], **options: Any) -> None:
    db.filters.insert_one(filter_document(filter_id, pipeline, group_id=group_id, **options))


def objects(*names: str) -> list[Doc]:
    return [{"$match": {"objectId": {"$in": list(names)}}}, {"$project": {"candid": 1}}]


def setup_for(cfg: Config, db: Any) -> FeedSetup:
    filters = [(d["group_id"], d["filter_id"]) for d in db.filters.find()]
    return asyncio.run(resolve_setup(cfg, ["ZTF"], filters))


def ingest(
    cfg: Config, client: Client, kafka: str, files: list[Path], setup: FeedSetup, **run: Any
) -> Ingester:
    replay(kafka, files, suffix=f"_{tag_of(cfg)}", progress=False)
    ingester = feed_ingester(cfg, client, kafka, setup)
    ingester.run(**({"until_idle": 4.0} | run))
    return ingester


def feed_ingester(cfg: Config, client: Client, kafka: str, setup: FeedSetup) -> Ingester:
    """An ingester of the test's consumer group that hands off to the SkyPortal feed."""
    return Ingester(
        cfg, client, kafka, ["ZTF"], group=f"feed-{tag_of(cfg)}", handoff=FeedFactory(cfg)
    )


def wait_for(
    check: Callable[[], bool], timeout: float = 120.0, why: Callable[[], Any] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {why()}"
        time.sleep(0.1)


def pending_of(db: Any) -> list[Doc]:
    return list(db.skyportal_outbox.find({"state": "pending"}, {"body": 0}).limit(5))


def deliver(cfg: Config, db: Any, setup: FeedSetup) -> None:
    """Run the delivery worker until the outbox holds no pending entry."""
    thread = DeliveryThread(cfg, setup).start()
    try:
        wait_for(
            lambda: db.skyportal_outbox.count_documents({"state": "pending"}) == 0,
            why=lambda: pending_of(db),
        )
    finally:
        thread.stop()


def sequence(fake: FakeSkyPortal) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in fake.writes()]


def mjd(jd: float) -> float:
    return jd - 2400000.5


# ------------------------------------------------------------------------------ start-up


def test_setup_resolves_instrument_streams_and_names(
    test_environ: dict[str, str], kafka_bootstrap: str, skyportal: FakeSkyPortal
) -> None:
    cfg = feed_config(test_environ, kafka_bootstrap, skyportal.port)
    setup = asyncio.run(resolve_setup(cfg, ["ZTF"], [(10, 1), (20, 2)]))
    assert setup.surveys["ZTF"].instrument_id == 7
    assert setup.surveys["ZTF"].streams == {
        "ZTF Public": 11,
        "ZTF Public+Partnership": 12,
        "ZTF Public+Partnership+Caltech": 13,
    }
    assert setup.group_names == {10: "Program A", 20: "Program B"}
    assert setup.filter_names == {1: "bright", 2: "annotated"}
    headers = skyportal.requests[0].headers
    assert headers["Authorization"] == f"token {TOKEN}"
    assert headers["User-Agent"].startswith("Kowalski v")


def test_a_survey_skyportal_cannot_take_waits_with_one_line(
    test_environ: dict[str, str], kafka_bootstrap: str, skyportal: FakeSkyPortal
) -> None:
    """No instrument, no stream, a refused token or SkyPortal down: the survey waits with a
    one-line reason (retried by the delivery); only a missing token stops the ingester."""

    def reason_of(cfg: Config) -> str:
        setup = asyncio.run(resolve_setup(cfg, ["ZTF"], []))
        assert not setup.surveys and "\n" not in setup.waiting["ZTF"]
        return setup.waiting["ZTF"]

    cfg = feed_config(test_environ, kafka_bootstrap, skyportal.port)
    skyportal.state.streams = skyportal.state.streams[:2]
    assert "has no stream for ZTF" in reason_of(cfg)
    assert "'ZTF Public+Partnership+Caltech'" in reason_of(cfg)
    skyportal.state.instruments = []
    assert "no instrument named 'ZTF'" in reason_of(cfg)
    bad_token = cfg.model_copy(
        update={"skyportal": cfg.skyportal.model_copy(update={"token": "wrong"})}
    )
    assert "rejected skyportal.token" in reason_of(bad_token)
    skyportal.stop()
    assert "is not reachable" in reason_of(cfg)
    no_token = cfg.model_copy(
        update={"skyportal": cfg.skyportal.model_copy(update={"token": None})}
    )
    with pytest.raises(FeedSetupError, match=r"skyportal\.token is not set"):
        asyncio.run(resolve_setup(no_token, ["ZTF"], []))

    # python -m ingester with SkyPortal down runs (archiving goes on) and says who waits
    env = {
        **test_environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KOWALSKI__misc__broker": "true",
        "KOWALSKI__skyportal__port": str(skyportal.port),
        "SKYPORTAL_TOKEN": TOKEN,
    }
    run = subprocess.run(
        [sys.executable, "-m", "ingester", "--survey", "ZTF", "--until-idle", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ZTF wait: SkyPortal at http://" in run.stderr and "is not reachable" in run.stderr
    without = {k: v for k, v in env.items() if k != "SKYPORTAL_TOKEN"}
    run = subprocess.run(
        [sys.executable, "-m", "ingester", "--until-idle", "1"],
        cwd=ROOT,
        env=without,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "error: misc.broker is true but skyportal.token is not set (SKYPORTAL_TOKEN)"
    )


# ------------------------------------------------------------------------------ new candidate


def posted(kind: str) -> float:
    """Observations of the SkyPortal post latency of ZTF entries of `kind` in this process."""
    labels = {"survey": "ZTF", "kind": kind}
    return REGISTRY.get_sample_value("kowalski_skyportal_post_latency_seconds_count", labels) or 0.0


def test_new_candidate_exact_sequence_and_bodies(
    feed: FeedMaker, kafka_bootstrap: str, dask_client: Client, skyportal: FakeSkyPortal
) -> None:
    cfg, db = feed()
    annotated: list[Doc] = [
        {"$match": {"objectId": "ZTF23abjjnqm"}},
        {"$project": {"candid": 1, "annotations": {"drb": "$candidate.drb"}}},
    ]
    autosave = {"active": True, "comment": "saved by the feed", "ignore_group_ids": [30]}
    add_filter(db, 1, 10, annotated, autosave={**autosave, "saver_id": 5})
    add_filter(db, 2, 20, annotated, autosave=True)
    setup = setup_for(cfg, db)
    ingest(cfg, dask_client, kafka_bootstrap, [FP_PACKET], setup)
    assert skyportal.writes() == []  # nothing is sent from the batch itself
    assert db.skyportal_outbox.count_documents({"state": "pending"}) == 9
    kinds = Counter(e["kind"] for e in db.skyportal_outbox.find({"state": "pending"}))
    before = {kind: posted(kind) for kind in kinds}
    deliver(cfg, db, setup)
    # each accepted entry's wait, queued to accepted, is observed once, by kind
    assert {kind: posted(kind) - before[kind] for kind in kinds} == dict(kinds)

    obj = "ZTF23abjjnqm"
    assert sequence(skyportal) == [
        ("POST", "/api/candidates"),
        ("POST", f"/api/sources/{obj}/annotations"),
        ("POST", f"/api/sources/{obj}/annotations"),
        ("PUT", "/api/photometry"),
        ("PUT", "/api/photometry"),
        ("POST", "/api/thumbnail"),
        ("POST", "/api/thumbnail"),
        ("POST", "/api/thumbnail"),
        ("POST", "/api/sources"),
        ("POST", f"/api/sources/{obj}/comments"),
    ]
    packet = decode_packet(FP_PACKET.read_bytes())[0]
    cand = packet["candidate"]
    [candidate] = skyportal.state.candidates[obj]
    assert candidate["filter_ids"] == [1, 2] and candidate["passing_alert_id"] == packet["candid"]
    assert candidate["score"] == cand["drb"] and candidate["origin"] == "Kowalski"
    assert (candidate["ra"], candidate["dec"]) == (cand["ra"], cand["dec"])
    notes = skyportal.state.annotations[obj]
    assert [a["origin"] for a in notes] == ["Program A:bright", "Program B:annotated"]
    assert notes[0]["data"] == {"drb": cand["drb"]} and notes[0]["group_ids"] == [10]

    alert_put, forced_put = skyportal.state.photometry[obj]
    history = [*packet["prv_candidates"], cand]
    expected_jds = sorted({p["jd"] for p in history if (p.get("diffmaglim") or 1) > 0})
    assert alert_put["mjd"] == pytest.approx([mjd(j) for j in expected_jds])
    assert alert_put["stream_ids"] == [11] and alert_put["instrument_id"] == 7
    assert set(alert_put["zp"]) == {23.9} and set(alert_put["magsys"]) == {"ab"}
    assert set(alert_put["origin"]) == {None} and alert_put["query"] == {}
    last = alert_put["mjd"].index(pytest.approx(mjd(cand["jd"])))
    assert alert_put["flux"][last] == pytest.approx(10 ** (-0.4 * (cand["magpsf"] - 23.9)))
    forced = sorted(
        (p for p in packet["fp_hists"] if p.get("procstatus") == "0"), key=lambda p: p["jd"]
    )
    assert len(forced_put["mjd"]) == len(forced) > 0
    assert set(forced_put["origin"]) == {"alert_fp"}
    assert forced_put["zp"] == pytest.approx([p["magzpsci"] for p in forced])
    assert forced_put["query"] == {"duplicate_ignore_flux": "true", "overwrite_flux": "true"}
    for flux, unc, point in zip(forced_put["flux"], forced_put["fluxerr"], forced, strict=True):
        snr = point["forcediffimflux"] / point["forcediffimfluxunc"]
        assert unc == pytest.approx(point["forcediffimfluxunc"])
        assert (flux is None) == (snr <= 3)

    assert sorted(t for (o, t) in skyportal.state.thumbnails if o == obj) == ["new", "ref", "sub"]
    [save] = [r for r in skyportal.processed("POST") if r.path == "/api/sources"]
    assert save.path == "/api/sources"
    assert save.body == {
        "id": obj,
        "group_ids": [10, 20],
        "origin": "Kowalski",
        "ignore_if_in_group_ids": {"10": [30]},  # read from the filter's autosave
        "saver_per_group_id": {"10": 5},
    }
    assert skyportal.state.comments[obj] == [{"text": "saved by the feed", "group_ids": [10]}]
    assert db.skyportal_outbox.count_documents({"state": "done"}) == 9

    # the same batch handed off again (a crash before it counted as done): nothing new is queued
    alert = found(db.ZTF_alerts.find_one({"candid": packet["candid"]}))
    passed: dict[int, list[Doc]] = {
        packet["candid"]: [
            {
                "filter_id": f,
                "group_id": g,
                "data": {"annotations": {"drb": cand["drb"]}},
                "autosave": True,
            }
            for f, g in ((1, 10), (2, 20))
        ]
    }
    assert asyncio.run(hand_off_again(cfg, setup, alert, passed)) == 9


async def hand_off_again(
    cfg: Config, setup: FeedSetup, alert: Doc, passed: dict[int, list[Doc]]
) -> int:
    from kowalski.db import async_client
    from kowalski.surveys import SURVEYS

    client = async_client(cfg)
    try:
        db = client[cfg.database.db]
        await FeedFactory(cfg)(db)(SURVEYS["ZTF"], [alert], passed)
        return await db.skyportal_outbox.count_documents({})
    finally:
        await client.close()


def test_known_object_gets_only_new_points_and_updates(
    feed: FeedMaker, kafka_bootstrap: str, dask_client: Client, skyportal: FakeSkyPortal
) -> None:
    cfg, db = feed()
    obj = "ZTF20aajcdad"
    annotated: list[Doc] = [
        {"$match": {"objectId": obj}},
        {"$project": {"candid": 1, "annotations": {"mag": "$candidate.magpsf"}}},
    ]
    add_filter(db, 1, 10, annotated, autosave=True, update_annotations=True)
    add_filter(db, 2, 20, annotated, autosave=True, update_annotations=False)
    setup = setup_for(cfg, db)
    first, second = (decode_packet((NIGHT / f).read_bytes())[0] for f in REPEATED)
    ingest(cfg, dask_client, kafka_bootstrap, [NIGHT / REPEATED[0]], setup)
    deliver(cfg, db, setup)
    assert skyportal.state.sources[obj] == {10, 20}
    [sent_first] = skyportal.state.photometry[obj]
    skyportal.state.sources[obj].discard(20)  # someone removed it from group 20 meanwhile
    before = len(skyportal.requests)

    ingest(cfg, dask_client, kafka_bootstrap, [NIGHT / REPEATED[1]], setup)
    deliver(cfg, db, setup)
    later = skyportal.requests[before:]
    [sent_next] = skyportal.state.photometry[obj][1:]
    assert min(sent_next["mjd"]) > max(sent_first["mjd"])  # only points SkyPortal lacks
    assert mjd(second["candidate"]["jd"]) == pytest.approx(sent_next["mjd"][-1])
    assert mjd(first["candidate"]["jd"]) == pytest.approx(sent_first["mjd"][-1])
    # annotations: looked up, the one with update_annotations updated, the other kept
    notes = {a["origin"]: a for a in skyportal.state.annotations[obj]}
    assert notes["Program A:bright"]["data"] == {"mag": second["candidate"]["magpsf"]}
    assert notes["Program B:annotated"]["data"] == {"mag": first["candidate"]["magpsf"]}
    puts = [r for r in later if r.method == "PUT" and "/annotations/" in r.path]
    assert len(puts) == 1 and puts[0].body["author_id"] == 1
    # autosave only to the group that does not hold it
    saves = [r for r in later if r.method == "POST" and r.path == "/api/sources"]
    assert [s.body["group_ids"] for s in saves] == [[20]]
    assert len(skyportal.state.candidates[obj]) == 2  # the new filter pass is posted
    assert not [r for r in later if r.path == "/api/thumbnail"]


# ------------------------------------------------------------------------------ follow-up


def test_auto_followup_create_match_update_and_timeout(
    feed: FeedMaker, kafka_bootstrap: str, dask_client: Client, skyportal: FakeSkyPortal
) -> None:
    cfg, db = feed()
    asc = {
        "active": True,
        "allocation_id": 3,
        "payload": {"priority": 2, "observation_type": "IFU"},
        "pipeline": json.dumps([{"$match": {}}]),
        "comment": "auto follow-up",
    }
    desc = {
        "active": True,
        "allocation_id": 4,
        "priority_order": "desc",
        "payload": {"priority": 3},
        "pipeline": json.dumps([{"$match": {}}]),
    }
    created, same, lower, timed_out = "ZTF20aahgyet", "ZTF20aafcnby", "ZTF20aalseuk", "ZTF20aafsnpp"
    desc_update, desc_keep = "ZTF20aadyyvk", "ZTF20aakyoez"
    add_filter(
        db, 3, 10, objects(created, same, lower, timed_out), autosave=True, auto_followup=asc
    )
    add_filter(db, 4, 20, objects(desc_update, desc_keep), autosave=True, auto_followup=desc)

    def existing(obj: str, allocation: int, group: int, priority: int, **payload: Any) -> None:
        skyportal.state.followups.append(
            {
                "id": 900 + len(skyportal.state.followups),
                "obj_id": obj,
                "allocation_id": allocation,
                "payload": {"priority": priority, **payload},
                "target_groups": [{"id": group}],
                "status": "submitted",
            }
        )

    existing(same, 3, 10, 2, observation_type="IFU")
    existing(lower, 3, 10, 1, observation_type="IFU")
    existing(desc_update, 4, 20, 5)
    existing(desc_keep, 4, 20, 1)
    # the creation for `timed_out` lands, but its answer comes after the client's timeout
    skyportal.fault(
        Fault("POST", "/api/followup_request", delay=7.5, when=lambda b: b["obj_id"] == timed_out)
    )
    setup = setup_for(cfg, db)
    ingest(cfg, dask_client, kafka_bootstrap, sorted(NIGHT.glob("*.avro")), setup)
    deliver(cfg, db, setup)

    def requests_of(obj: str) -> list[Doc]:
        return [f for f in skyportal.state.followups if f["obj_id"] == obj]

    posts = skyportal.processed("POST", "/api/followup_request")
    assert sorted(p.body["obj_id"] for p in posts) == sorted([created, timed_out])  # once each
    [new] = requests_of(created)
    assert new["allocation_id"] == 3 and new["payload"]["priority"] == 2
    assert new["payload"]["observation_type"] == "IFU" and "end_date" in new["payload"]
    [post] = [p for p in posts if p.body["obj_id"] == created]
    assert post.body["target_group_ids"] == [10] and post.body["source_group_ids"] == [10]
    assert post.body["not_if_duplicates"] is True and post.body["radius"] == 0.5
    assert {"text": "auto follow-up (priority: 2)", "group_ids": [10]} in skyportal.state.comments[
        created
    ]
    assert len(requests_of(timed_out)) == 1
    timed = found(db.skyportal_outbox.find_one({"obj_id": timed_out, "kind": "followup"}))
    assert timed["state"] == "done" and timed["attempts"] == 2 and "Timeout" in timed["last_error"]
    assert [r["payload"]["priority"] for r in requests_of(same)] == [2]  # no duplicate, no update
    assert [r["payload"]["priority"] for r in requests_of(lower)] == [2]  # asc: 1 -> 2
    assert [r["payload"]["priority"] for r in requests_of(desc_update)] == [3]  # desc: 5 -> 3
    assert [r["payload"]["priority"] for r in requests_of(desc_keep)] == [1]  # desc: 1 stays
    updates = skyportal.processed("PUT", "/api/followup_request/")
    assert sorted(u.body["obj_id"] for u in updates) == sorted([lower, desc_update])
    assert all(u.body["allocation_id"] in (3, 4) for u in updates)


# ------------------------------------------------------------------------------ failures


def test_503_twice_then_200_loses_and_duplicates_nothing(
    feed: FeedMaker, kafka_bootstrap: str, dask_client: Client, skyportal: FakeSkyPortal
) -> None:
    cfg, db = feed()
    add_filter(db, 1, 10, BRIGHT, autosave=True)
    setup = setup_for(cfg, db)
    obj = "ZTF20aaelulu"
    # one candidate post: 503 on both tries of its first attempt (the client retries once),
    # then 200 on the next attempt from the outbox; more 503/429 on other calls meanwhile
    skyportal.fault(Fault("POST", "/api/candidates", 503, count=2, when=lambda b: b["id"] == obj))
    skyportal.fault(Fault("PUT", "/api/photometry", status=503, count=2))
    skyportal.fault(Fault("POST", "/api/sources", status=503, count=2))
    skyportal.fault(Fault("POST", "/api/thumbnail", status=429, count=1))
    ingest(cfg, dask_client, kafka_bootstrap, sorted(NIGHT.glob("*.avro")), setup)
    deliver(cfg, db, setup)
    assert_each_entry_delivered_once(db, skyportal)
    first = found(db.skyportal_outbox.find_one({"obj_id": obj, "kind": "candidate"}))
    assert first["attempts"] == 2 and "HTTP 503" in first["last_error"]
    assert len(skyportal.state.candidates[obj]) == 1
    faulted = [r for r in skyportal.requests if r.method != "GET" and not r.answered]
    assert len(faulted) == 7  # every injected fault was hit


def test_two_batches_of_one_new_object_at_once_save_and_annotate_it_once(
    feed: FeedMaker, kafka_bootstrap: str, dask_client: Client, skyportal: FakeSkyPortal
) -> None:
    """Two workers hand off batches with alerts of one new object at the same time: one entry
    is queued as for a new object, the other as for a known one, and here the known one comes
    first (the later alert's batch made the object a candidate). The source is saved once and
    the annotation posted once."""
    cfg, db = feed()
    add_filter(db, 1, 10, objects("nothing"), autosave=True)  # alerts stored, nothing passes
    setup = setup_for(cfg, db)
    ingest(cfg, dask_client, kafka_bootstrap, [NIGHT / f for f in REPEATED], setup)
    candids = [decode_packet((NIGHT / f).read_bytes())[0]["candid"] for f in REPEATED]
    alerts = [found(db.ZTF_alerts.find_one({"candid": c})) for c in reversed(candids)]
    passes = [
        {
            a["candid"]: [
                {
                    "filter_id": 1,
                    "group_id": 10,
                    "data": {"annotations": {"x": 1}},
                    "autosave": True,
                }
            ]
        }
        for a in alerts
    ]
    asyncio.run(hand_off_together(cfg, setup, alerts, passes))
    modes = {e["mode"] for e in db.skyportal_outbox.find({"kind": "autosave"})}
    assert modes == {"new", "known"}
    deliver(cfg, db, setup)
    posts = skyportal.processed("POST")
    assert len([r for r in posts if r.path == "/api/sources"]) == 1
    assert len([r for r in posts if r.path.endswith("/annotations")]) == 1


async def hand_off_together(
    cfg: Config, setup: FeedSetup, alerts: list[Doc], passes: list[dict[int, list[Doc]]]
) -> None:
    """Each alert handed off as a batch of its own, all at the same time."""
    from kowalski.db import async_client
    from kowalski.surveys import SURVEYS

    client = async_client(cfg)
    try:
        stage = FeedFactory(cfg)(client[cfg.database.db])
        await asyncio.gather(
            *(stage(SURVEYS["ZTF"], [a], p) for a, p in zip(alerts, passes, strict=True))
        )
    finally:
        await client.close()


def test_a_post_whose_answer_is_lost_is_not_sent_again(
    feed: FeedMaker, kafka_bootstrap: str, dask_client: Client, skyportal: FakeSkyPortal
) -> None:
    """The first autosave lands but its answer comes after the client's timeout (as from a
    loaded SkyPortal): the client does not POST it again; the entry's next attempt finds the
    source in its group and saves nothing twice."""
    # a 3 s client timeout and an answer 7.5 s late: lost even when a loaded machine is slow
    cfg, db = feed(KOWALSKI__skyportal__timeout_s="3")
    add_filter(db, 1, 10, BRIGHT, autosave=True)
    setup = setup_for(cfg, db)
    skyportal.fault(Fault("POST", "/api/sources", delay=7.5, count=1))
    ingest(cfg, dask_client, kafka_bootstrap, sorted(NIGHT.glob("*.avro")), setup)
    deliver(cfg, db, setup)
    saves = [r for r in skyportal.requests if r.method == "POST" and r.path == "/api/sources"]
    saved = [r.body["id"] for r in saves]
    assert saved and len(saved) == len(set(saved))  # each source saved once
    late = found(db.skyportal_outbox.find_one({"kind": "autosave", "obj_id": saved[0]}))
    assert late["state"] == "done" and late["attempts"] == 2
    assert "answer lost" in late["last_error"]
    looked = [r for r in skyportal.requests if r.path == f"/api/sources/{saved[0]}"]
    # the retry looked before writing (a look-up slower than the client's timeout under load is
    # asked again: HEAD is repeatable) and wrote nothing
    assert looked and {r.method for r in looked} == {"HEAD"}


@pytest.mark.timeout(900)
def test_skyportal_down_through_replay_and_restart_then_back(
    test_environ: dict[str, str],
    feed: FeedMaker,
    kafka_bootstrap: str,
    dask_client: Client,
    skyportal: FakeSkyPortal,
) -> None:
    cfg, db = feed(KOWALSKI__ingester__batch_size="4")
    add_filter(db, 1, 10, BRIGHT, autosave=True)
    setup = setup_for(cfg, db)
    skyportal.stop()
    files = sorted(ZTF_ALERTS.rglob("*.avro"))

    # first ingester (with its delivery worker) stops mid-stream while SkyPortal is down
    delivery = DeliveryThread(cfg, setup).start()
    stop = threading.Event()
    replay(kafka_bootstrap, files, suffix=f"_{tag_of(cfg)}", progress=False)
    first = feed_ingester(cfg, dask_client, kafka_bootstrap, setup)
    watcher = threading.Thread(target=stop_when_committed, args=(first, 8, stop))
    watcher.start()
    first.run(stop=stop)
    watcher.join()
    wait_for(lambda: db.skyportal_outbox.count_documents({"attempts": {"$gt": 0}}) > 0)
    delivery.stop()
    assert db.skyportal_outbox.count_documents({"state": {"$ne": "pending"}}) == 0

    # restarted while SkyPortal is still down: the rest of the night is queued
    delivery = DeliveryThread(cfg, setup).start()
    second = feed_ingester(cfg, dask_client, kafka_bootstrap, setup)
    second.run(until_idle=4.0)
    assert first.committed + second.committed == len(files)
    pending = db.skyportal_outbox.count_documents({"state": "pending"})
    alerts = [decode_packet(f.read_bytes())[0] for f in files]
    passing = [a for a in alerts if (a["candidate"].get("drb") or 0) > 0.9]
    expected_objects = {a["objectId"] for a in passing}
    report = asyncio.run(status_of(cfg))
    assert report["counts"]["ZTF candidate"]["pending"] == len(passing)
    assert report["setup"] == []  # this delivery was handed a resolved set-up
    assert report["oldest_pending"] is not None
    assert db.skyportal_outbox.count_documents({"state": "pending", "attempts": {"$gt": 0}}) > 0
    assert "oldest pending:" in format_status(report)
    cli = subprocess.run(
        [sys.executable, str(ROOT / "kowalski.py"), "feed", "status"],
        cwd=ROOT,
        env={**test_environ, "KOWALSKI__database__db": cfg.database.db},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and "candidate" in cli.stdout and str(pending) in cli.stdout

    # SkyPortal comes back: everything is delivered, exactly once
    skyportal.start()
    wait_for(
        lambda: db.skyportal_outbox.count_documents({"state": "pending"}) == 0,
        why=lambda: pending_of(db),
    )
    delivery.stop()
    assert_each_entry_delivered_once(db, skyportal)
    assert set(skyportal.state.candidates) == expected_objects
    assert sum(len(v) for v in skyportal.state.candidates.values()) == len(passing)


async def status_of(cfg: Config) -> Doc:
    from kowalski.db import async_client

    client = async_client(cfg)
    try:
        return await status(client[cfg.database.db], cfg)
    finally:
        await client.close()


def assert_each_entry_delivered_once(db: Any, skyportal: FakeSkyPortal) -> None:
    entries = list(db.skyportal_outbox.find())
    assert entries and all(e["state"] == "done" for e in entries)
    writes = skyportal.writes()
    assert all(w.answered == 200 for w in writes)
    sent: dict[tuple[str, str], int] = {}
    for w in writes:
        key = (w.path, json.dumps(w.body, sort_keys=True))
        sent[key] = sent.get(key, 0) + 1
    assert all(count == 1 for count in sent.values()), [k for k, c in sent.items() if c > 1]

    def count(kind: str) -> int:
        return sum(1 for e in entries if e["kind"] == kind)

    assert len([w for w in writes if w.path == "/api/candidates"]) == count("candidate") > 0
    assert len([w for w in writes if w.path == "/api/photometry"]) == count("photometry") > 0
    assert len([w for w in writes if w.path == "/api/thumbnail"]) == count("thumbnail") > 0
    saves = [e for e in entries if e["kind"] == "autosave" and e["result"]["saved_to"]]
    assert len([w for w in writes if w.path == "/api/sources"]) == len(saves) > 0


# ------------------------------------------------------------------------------ broker off


def test_broker_off_posts_and_queues_nothing(
    feed: FeedMaker, kafka_bootstrap: str, dask_client: Client, skyportal: FakeSkyPortal
) -> None:
    cfg, db = feed(KOWALSKI__misc__broker="false")
    add_filter(db, 1, 10, BRIGHT, autosave=True)
    setup = setup_for(cfg, db)
    ingested = ingest(cfg, dask_client, kafka_bootstrap, sorted(NIGHT.glob("*.avro")), setup)
    assert ingested.report.passed > 0
    assert db.skyportal_outbox.count_documents({}) == 0
    assert skyportal.writes() == []
