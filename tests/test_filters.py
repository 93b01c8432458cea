"""Filters inside the ingester: batch runs, autosave / auto_followup, the hand-off record."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pymongo import AsyncMongoClient

from ingester.ml import load_models
from ingester.pipeline import Packet, Pipeline
from kowalski.config import build_config
from kowalski.surveys import SURVEYS, Survey

from .conftest import ZTF_ALERTS


async def test_filters_autosave_followup_and_handoff(
    test_environ: dict[str, str], mongo_uri: str
) -> None:
    cfg = build_config(
        [], {**test_environ, "KOWALSKI__database__db": f"filters_{uuid.uuid4().hex[:8]}"}
    )
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri)
    db = client[cfg.database.db]
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
            {
                "filter_id": 1,
                "group_id": 10,
                "catalog": "ZTF_alerts",
                "permissions": [1],
                "active": True,
                "active_fid": "v1",
                "fv": [{"fid": "v1", "pipeline": json.dumps(keep_candid)}],
                "autosave": autosave,
                "auto_followup": followup,
            },
            {
                "filter_id": 2,
                "group_id": 20,
                "catalog": "ZTF_alerts",
                "permissions": [1],
                "active": True,
                "active_fid": "v1",
                "fv": [{"fid": "v1", "pipeline": json.dumps(drop_candid)}],
                "autosave": False,
            },
            {
                "filter_id": 3,
                "group_id": 30,
                "catalog": "ZTF_alerts",
                "permissions": [1],
                "active": False,
                "active_fid": "v1",
                "fv": [{"fid": "v1", "pipeline": json.dumps([{"$match": {}}])}],
            },
        ]
    )
    handed: list[tuple[Survey, list[dict[str, Any]], dict[int, list[dict[str, Any]]]]] = []

    async def handoff(
        survey: Survey, alerts: list[dict[str, Any]], passed: dict[int, list[dict[str, Any]]]
    ) -> None:
        handed.append((survey, alerts, passed))

    pipeline = Pipeline(cfg, db, {"ZTF": load_models(cfg)}, handoff=handoff)
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
    await client.drop_database(cfg.database.db)
    await client.close()
