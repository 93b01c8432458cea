"""`POST /api/filters/{id}/explain` on the bundled real ZTF alerts, served by gunicorn and called
with penquins: stage-by-stage counts, passes per night equal to a back-fill's, a draft against
the active version, data rights."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

from pymongo import AsyncMongoClient

from ingester import backfill as runner
from kowalski import backfill
from kowalski.testing.filters import filter_document

from .apiclient import Api, gunicorn_api, gunicorn_users
from .conftest import found

api = gunicorn_api  # a gunicorn server of this module's own (fixtures)
users = gunicorn_users

Doc = dict[str, Any]
ACTIVE = [
    {"$match": {"candidate.drb": {"$gt": 0.5}}},
    {"$match": {"candidate.magpsf": {"$lt": 19.5}}},
    {"$project": {"candid": 1, "objectId": 1, "drb": "$candidate.drb"}},
]
DRAFT = [
    {"$match": {"candidate.drb": {"$gt": 0.5}}},
    {"$match": {"candidate.magpsf": {"$lt": 18.5}}},
    {"$project": {"candid": 1, "objectId": 1}},
]
EVERY_NIGHT = {"start": "2018-01-01", "end": "2024-01-01"}


def explained(api: Api, token: str, body: Doc, filter_id: int = 8) -> Doc:
    r = api.call("POST", f"/api/filters/{filter_id}/explain", token, json=body)
    assert r.status_code == 200, r.text
    data: Doc = r.json()["data"]
    return data


def backfilled_passes(api: Api, mongo_uri: str, filter_id: int) -> set[int]:
    """The passes of a back-fill of the filter over the same range, run here."""

    async def run() -> set[int]:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri)
        try:
            db = client[api.cfg.database.db]
            doc = found(await db.filters.find_one({"filter_id": filter_id}))
            job = await backfill.create_job(
                db,
                api.cfg,
                doc,
                owner="admin",
                admin=True,
                allowed=None,
                jd_range=(
                    backfill.julian_date(EVERY_NIGHT["start"], "start"),
                    backfill.julian_date(EVERY_NIGHT["end"], "end"),
                ),
            )
            await runner.work(db, api.cfg, threading.Event(), until_idle=0)
            records = await db.filter_backfill_passes.find({"job_id": job["_id"]}).to_list()
            return {r["candid"] for r in records if r["state"] == "passed"}
        finally:
            await client.close()

    return asyncio.run(run())


def test_explain_stage_by_stage_matches_the_backfill(
    api: Api, users: dict[str, str], mongo_uri: str
) -> None:
    api.db.filters.insert_one(filter_document(8, ACTIVE, fid="a1"))
    k = api.penquins()
    answer = k.api("post", "api/filters/8/explain", data={**EVERY_NIGHT, "max_alerts": 100})
    assert answer["status"] == "success", answer
    data = answer["data"]
    assert data["fid"] == "a1" and "compared_with" not in data  # the active version itself
    stages = data["stages"]
    assert [s["stage"] for s in stages[-3:]] == [
        "filter[0] $match",
        "filter[1] $match",
        "filter[2] $project",
    ]
    assert stages[0]["docs"] == data["sample"]["alerts"] == api.db.ZTF_alerts.count_documents({})
    for before, after in itertools.pairwise(stages):
        if after["stage"].endswith("$match"):
            assert after["docs"] <= before["docs"]
        else:
            assert after["docs"] == before["docs"]  # $project and $lookup keep every document
        assert after["stage_ms"] >= 0 and after["prefix_ms"] > 0
    passes = data["passes"]
    assert passes["count"] == stages[-1]["docs"] == len(passes["candids"])
    assert sum(passes["per_night"].values()) == passes["count"]
    assert set(passes["per_night"]) <= set(data["sample"]["nights"])
    assert set(passes["candids"]) == backfilled_passes(api, mongo_uri, 8)


def test_explain_a_draft_against_the_active_version(api: Api, users: dict[str, str]) -> None:
    api.db.filters.insert_one(filter_document(9, ACTIVE, fid="a9"))
    active = explained(api, users["admin"], {**EVERY_NIGHT, "max_alerts": 100}, 9)
    draft = explained(api, users["admin"], {**EVERY_NIGHT, "pipeline": DRAFT}, 9)
    assert draft["fid"] == "draft"
    compared = draft["compared_with"]
    assert compared["fid"] == "a9" and compared["passes"] == active["passes"]["count"]
    draft_passes, active_passes = set(draft["passes"]["candids"]), set(active["passes"]["candids"])
    assert compared["lost"] == sorted(active_passes - draft_passes) and compared["lost"]
    assert compared["gained"] == [] and draft_passes < active_passes  # a stricter cut

    night = explained(api, users["admin"], {"night": "20200202"}, 9)
    assert set(night["sample"]["nights"]) == {"2020-02-02"}
    latest = explained(api, users["admin"], {"max_alerts": 5}, 9)
    assert latest["sample"]["alerts"] == 5

    # the public user explains over public alerts only
    public = explained(api, users["public"], {**EVERY_NIGHT, "max_alerts": 100}, 9)
    assert public["permissions"] == [1]
    assert public["sample"]["alerts"] == api.db.ZTF_alerts.count_documents(
        {"candidate.programid": 1}
    )
    for bad, message in (
        ({"pipeline": [{"$lookup": {"from": "users"}}]}, "forbidden"),
        ({"night": "2020-13-45"}, "night must be"),
        ({"start": 2459000}, "start and end come as a pair"),
        ({"max_alerts": 10**6}, "max_alerts may be at most"),
        ({"fid": "zz"}, "filter version fid zz not in filter.fv"),
    ):
        r = api.call("POST", "/api/filters/9/explain", users["admin"], json=bad)
        assert r.status_code == 400 and message in r.json()["message"], r.text
