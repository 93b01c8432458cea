"""Filters inside the ingester: batch runs, autosave / auto_followup, the hand-off record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

from pymongo import AsyncMongoClient

from ingester import filters
from ingester.ml import load_models
from ingester.pipeline import Packet, Pipeline
from kowalski.config import ROOT, build_config
from kowalski.surveys import SURVEYS, Survey
from kowalski.testing.filters import filter_document

from .conftest import ZTF_ALERTS


async def test_filters_autosave_followup_and_handoff(
    test_environ: dict[str, str], mongo: AsyncMongoClient[dict[str, Any]]
) -> None:
    cfg = build_config(
        [], {**test_environ, "KOWALSKI__database__db": f"filters_{uuid.uuid4().hex[:8]}"}
    )
    db = mongo[cfg.database.db]
    keep_candid = [
        {"$match": {"candidate.drb": {"$gt": 0.9}}},
        {"$project": {"candid": 1, "objectId": 1}},
    ]
    drop_candid = [
        {"$match": {"candidate.drb": {"$gt": 0.9}}},
        {"$project": {"_id": 0, "objectId": 1, "annotations": {"drb": "$candidate.drb"}}},
    ]
    autosave = {
        "active": True,
        "comment": "auto",
        "pipeline": json.dumps([{"$match": {"candidate.magpsf": {"$lt": 17}}}]),
    }
    followup = {
        "active": True,
        "allocation_id": 3,
        "payload": {"priority": 2},
        "pipeline": json.dumps([{"$match": {}}]),
    }
    await db.filters.insert_many(
        [
            filter_document(
                1,
                keep_candid,
                group_id=10,
                permissions=[1],
                fid="v1",
                autosave=autosave,
                auto_followup=followup,
            ),
            filter_document(2, drop_candid, group_id=20, permissions=[1], fid="v1"),
            filter_document(3, [{"$match": {}}], group_id=30, permissions=[1], active=False),
        ]
    )
    handed: list[tuple[Survey, list[dict[str, Any]], dict[int, list[dict[str, Any]]]]] = []

    async def handoff(
        survey: Survey, alerts: list[dict[str, Any]], passed: dict[int, list[dict[str, Any]]]
    ) -> None:
        handed.append((survey, alerts, passed))

    pipeline = Pipeline(cfg, db, {"ZTF": load_models(cfg, "ZTF")}, handoff=handoff)
    files = sorted((ZTF_ALERTS / "20200202").glob("*.avro"))
    report = await pipeline.process(
        SURVEYS["ZTF"], [Packet("t", 0, i, f.read_bytes()) for i, f in enumerate(files)]
    )
    assert report.stored == 12

    [(survey, alerts, passed)] = handed
    assert survey.name == "ZTF" and len(alerts) == 12
    docs = {a["candid"]: a for a in alerts}
    expected = {
        c
        for c, a in docs.items()
        if (a["candidate"].get("drb") or 0) > 0.9 and a["candidate"]["programid"] == 1
    }
    assert set(passed) == expected and expected
    for candid, records in passed.items():
        by_filter = {r["filter_id"]: r for r in records}
        assert set(by_filter) == {1, 2}  # the inactive filter never runs
        bright = docs[candid]["candidate"]["magpsf"] < 17
        assert by_filter[1]["autosave"] == ({"comment": "auto"} if bright else False)
        assert ("auto_followup" in by_filter[1]) == bright
        if bright:
            assert by_filter[1]["auto_followup"]["allocation_id"] == 3
        assert by_filter[2]["data"]["annotations"]["drb"] == docs[candid]["candidate"]["drb"]
    runs = await db.filter_runs.find(
        {}, {"_id": 0, "filter_id": 1, "passed": 1, "candids": 1}
    ).to_list()
    assert {r["filter_id"] for r in runs} == {1, 2}
    assert all(len(r["candids"]) == 12 and set(r["passed"]) == expected for r in runs)
    await mongo.drop_database(cfg.database.db)


async def test_a_filter_failing_on_one_alert_is_split_down_and_only_that_alert_fails(
    test_environ: dict[str, str], mongo: AsyncMongoClient[dict[str, Any]]
) -> None:
    """A real aggregation error on one alert only ($divide by zero where the candid is that
    alert's): the batch run fails, is split down to single alerts, the other alerts are filtered
    normally and only that alert is recorded failed, counted, and listed by the admin CLI."""
    db_name = f"filters_{uuid.uuid4().hex[:8]}"
    environ = {**test_environ, "KOWALSKI__database__db": db_name}
    cfg = build_config([], environ)
    db = mongo[cfg.database.db]
    files = sorted((ZTF_ALERTS / "20200202").glob("*.avro"))
    packets = [Packet("t", 0, i, f.read_bytes()) for i, f in enumerate(files)]
    bad = int(files[5].stem)  # the file name is the alert's candid
    divisor = {"$cond": [{"$eq": ["$candid", bad]}, 0, 1]}
    pipeline = [{"$project": {"candid": 1, "objectId": 1, "x": {"$divide": [1, divisor]}}}]
    await db.filters.insert_one(filter_document(7, pipeline, group_id=70, fid="v1"))
    handed: list[dict[int, list[dict[str, Any]]]] = []

    async def handoff(
        survey: Survey, alerts: list[dict[str, Any]], passed: dict[int, list[dict[str, Any]]]
    ) -> None:
        handed.append(passed)

    report = await Pipeline(cfg, db, {}, handoff=handoff).process(SURVEYS["ZTF"], packets)
    candids = {int(f.stem) for f in files}
    assert report.stored == 12 and report.filter_failures == 1 and report.filter_retries > 0
    assert set(handed[0]) == candids - {bad}
    runs = await db.filter_runs.find({"filter_id": 7}).to_list()
    [failed] = [r for r in runs if r["state"] == "failed"]
    assert failed["candids"] == [bad] and "divide by zero" in failed["error"]
    assert {c for r in runs if r["state"] == "ok" for c in r["candids"]} == candids - {bad}
    assert {c for r in runs for c in r["passed"]} == candids - {bad}

    listed = subprocess.run(
        [sys.executable, "-m", "ingester", "failed-filters", "--json"],
        cwd=ROOT,
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    assert json.loads(line)["candids"] == [bad] and json.loads(line)["filter_id"] == 7

    # the same batch again (as after a crash before the hand-off was recorded): nothing doubled
    await db[cfg.database.collections.get("handoffs", "handoffs")].delete_many({})
    again = await Pipeline(cfg, db, {}, handoff=handoff).process(SURVEYS["ZTF"], packets)
    assert again.filter_failures == 1, again
    assert len(handed) == 2 and set(handed[1]) == candids - {bad}, (len(handed), again)
    assert await db.filter_runs.count_documents({"filter_id": 7}) == len(runs)
    await mongo.drop_database(cfg.database.db)


async def test_filters_sharing_permissions_run_together_with_the_same_answers(
    test_environ: dict[str, str], mongo: AsyncMongoClient[dict[str, Any]]
) -> None:
    """Filters with the same permissions share one `$facet` run; its answers equal each filter run
    alone, a filter dropping candid or failing on one alert falls back to running alone."""
    cfg = build_config(
        [], {**test_environ, "KOWALSKI__database__db": f"filters_{uuid.uuid4().hex[:8]}"}
    )
    db = mongo[cfg.database.db]
    files = sorted((ZTF_ALERTS / "20200202").glob("*.avro"))
    packets = [Packet("t", 0, i, f.read_bytes()) for i, f in enumerate(files)]
    await Pipeline(cfg, db, {}).process(SURVEYS["ZTF"], packets)
    candids = [int(f.stem) for f in files]
    bad = candids[3]
    shapes: dict[int, list[dict[str, Any]]] = {
        1: [{"$match": {"candidate.drb": {"$gt": 0.5}}}, {"$project": {"candid": 1}}],
        2: [{"$project": {"candid": 1, "annotations.n": {"$size": "$prv_candidates"}}}],
        3: [{"$match": {"candidate.magpsf": {"$lt": 19}}}, {"$project": {"_id": 0, "objectId": 1}}],
        4: [
            {
                "$project": {
                    "candid": 1,
                    "x": {"$divide": [1, {"$cond": [{"$eq": ["$candid", bad]}, 0, 1]}]},
                }
            }
        ],
    }
    templates = [
        filters.FilterTemplate(k, 1, "v1", "ZTF_alerts", [1, 2, 3], pipeline)
        for k, pipeline in shapes.items()
    ]
    alone = {
        t.filter_id: await filters._run(db, cfg, t, t.pipeline, candids) for t in templates[:3]
    }
    shared = await filters.run_together(db, cfg, templates[:3], candids)
    assert set(shared) == {0, 1}  # filter 3 drops candid: it runs alone
    assert shared[0] == alone[1] and shared[1] == alone[2] and alone[1] and alone[2]

    results = await filters.run_filters(db, cfg, templates, candids)
    by_filter: dict[int, set[int]] = {}
    for candid, entries in results.passed.items():
        for entry in entries:
            by_filter.setdefault(entry["filter_id"], set()).add(candid)
    assert {k: by_filter.get(k, set()) for k in (1, 2, 3)} == {k: set(v) for k, v in alone.items()}
    assert by_filter[4] == set(candids) - {bad} and results.failures == 1
    await mongo.drop_database(cfg.database.db)
