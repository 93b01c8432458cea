"""ingester/skyportal/delivery.py at every crash point: a delivery that dies after writing to
SkyPortal and before recording it (or between the steps of an entry) is taken over by another
delivery, which looks before writing: no annotation, source, comment or follow-up request is
written twice, and no follow-up comment is lost. Refused photometry is posted again with the
object's next alert. Real ZTF packets, Kafka, the database; the in-test SkyPortal."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from typing import Any

import pytest
from distributed import Client
from pymongo import AsyncMongoClient

from ingester.skyportal.client import SkyPortalClient
from ingester.skyportal.delivery import Delivery
from ingester.skyportal.stage import FeedSetup
from kowalski.config import Config

from . import test_ingestion, test_skyportal
from .conftest import found
from .fake_skyportal import FakeSkyPortal, Fault
from .test_skyportal import NIGHT, FeedMaker, add_filter, ingest, setup_for

# the fixtures this module shares with the feed's other tests
dask_client = test_ingestion.dask_client
feed = test_skyportal.feed
skyportal = test_skyportal.skyportal

Doc = dict[str, Any]
OBJ = "ZTF20aahgyet"  # a real alert of the night that the filter below passes
FOLLOWUP = {
    "active": True,
    "allocation_id": 3,
    "payload": {"priority": 2, "observation_type": "IFU"},
    "pipeline": json.dumps([{"$match": {}}]),
    "comment": "auto follow-up",
}
AUTOSAVE = {"active": True, "comment": "saved by the feed"}
PIPELINE: list[Doc] = [
    {"$match": {"objectId": OBJ}},
    {"$project": {"candid": 1, "annotations.drb": "$candidate.drb"}},
]


class Crash(BaseException):
    """The delivery process dies here (not an error the delivery could handle)."""


class CrashingDelivery(Delivery):
    """Dies at the `nth` call of `step` (`_finish` or `_progress`) for an entry of `kind`."""

    kind = ""
    step = ""
    nth = 1
    calls = 0
    crashed = False

    async def _check(self, step: str, entry: Doc) -> None:
        if self.crashed or step != self.step or entry["kind"] != self.kind:
            return
        self.calls += 1
        if self.calls == self.nth:
            self.crashed = True
            raise Crash

    async def _finish(self, entry: Doc, changes: Doc) -> None:
        await self._check("_finish", entry)
        await super()._finish(entry, changes)

    async def _progress(self, entry: Doc, step: str, value: Any) -> None:
        await self._check("_progress", entry)  # the step's write is done, not yet recorded
        await super()._progress(entry, step, value)


async def deliver_with_crash(cfg: Config, setup: FeedSetup, kind: str, step: str, nth: int) -> bool:
    """One delivery that dies at the crash point, its lease left to expire, then another."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(cfg.database.uri)
    db = client[cfg.database.db]
    try:
        async with SkyPortalClient(cfg) as sp:
            dying = CrashingDelivery(cfg, db, sp, setup)
            dying.kind, dying.step, dying.nth = kind, step, nth
            with contextlib.suppress(Crash):
                await dying.drain(60)
            crashed = dying.crashed
            for task in list(dying._tasks):
                task.cancel()
            # the dead process's lease expires
            await db.skyportal_outbox.update_many({}, {"$set": {"lease_until": None}})
            assert await Delivery(cfg, db, sp, setup).drain(120)
            return crashed
    finally:
        await client.close()


def writes(skyportal: FakeSkyPortal, method: str, path: str) -> int:
    return sum(1 for r in skyportal.processed(method) if r.path == path)


@pytest.mark.parametrize(
    ("kind", "step", "nth"),
    [
        ("annotation", "_finish", 1),  # after the POST, before the attempt is recorded
        ("autosave", "_progress", 1),  # after the source is saved, before that is recorded
        ("autosave", "_progress", 2),  # after the comment, before that is recorded
        ("autosave", "_finish", 1),
        ("followup", "_progress", 1),  # after the request is created, before that is recorded
        ("followup", "_progress", 2),  # after its comment, before that is recorded
        ("followup", "_finish", 1),
    ],
)
def test_a_delivery_dying_after_a_write_writes_nothing_twice(
    feed: FeedMaker,
    kafka_bootstrap: str,
    dask_client: Client,
    skyportal: FakeSkyPortal,
    kind: str,
    step: str,
    nth: int,
) -> None:
    cfg, db = feed()
    skyportal.add_group(10, "Program A", {1: "bright"})
    add_filter(db, 1, 10, PIPELINE, autosave=AUTOSAVE, auto_followup=FOLLOWUP)
    setup = setup_for(cfg, db)
    ingest(cfg, dask_client, kafka_bootstrap, sorted(NIGHT.glob("*.avro")), setup)
    assert asyncio.run(deliver_with_crash(cfg, setup, kind, step, nth))
    states = Counter(d["state"] for d in db.skyportal_outbox.find({"obj_id": OBJ}))
    assert states == {"done": states["done"]}, list(db.skyportal_outbox.find({"state": "failed"}))
    assert len(skyportal.state.annotations[OBJ]) == 1
    assert writes(skyportal, "POST", f"/api/sources/{OBJ}/annotations") == 1
    assert writes(skyportal, "POST", "/api/sources") == 1
    assert len([r for r in skyportal.state.followups if r["obj_id"] == OBJ]) == 1
    texts = Counter(c["text"] for c in skyportal.state.comments[OBJ])
    assert texts == {"saved by the feed": 1, "auto follow-up (priority: 2)": 1}


def test_refused_photometry_is_posted_with_the_next_alert(
    feed: FeedMaker, kafka_bootstrap: str, dask_client: Client, skyportal: FakeSkyPortal
) -> None:
    """SkyPortal refuses a photometry PUT (4xx): the entry is failed and visible, and what it
    carried was not counted as sent: the object's next alert posts those points again."""
    cfg, db = feed()
    add_filter(db, 1, 10, [{"$match": {}}, {"$project": {"candid": 1}}])
    setup = setup_for(cfg, db)
    files = sorted(NIGHT.glob("*.avro"))
    skyportal.fault(Fault("PUT", "/api/photometry", status=400, count=1000))
    ingest(cfg, dask_client, kafka_bootstrap, files, setup)

    async def drain() -> None:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(cfg.database.uri)
        try:
            async with SkyPortalClient(cfg) as sp:
                assert await Delivery(cfg, client[cfg.database.db], sp, setup).drain(120)
        finally:
            await client.close()

    asyncio.run(drain())
    refused = found(db.skyportal_outbox.find_one({"kind": "photometry", "state": "failed"}))
    assert "400" in refused["last_error"]
    state = found(db.skyportal_objects.find_one({"_id": f"ZTF:{refused['obj_id']}"}))
    assert state["last_jd"][refused["key"]] < refused["first_jd"]  # not counted as sent
