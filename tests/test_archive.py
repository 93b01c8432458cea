"""ingester/archive.py: the per-object history (aux) written in one bulk per batch, with
optimistic concurrency; real ZTF packets, a real database server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.collection import AsyncCollection

from ingester import archive
from ingester.mongify import Parts, history_key
from ingester.shapes import split
from kowalski.surveys import SURVEYS

from .apiclient import decoded_alerts

Doc = dict[str, Any]
ZTF = SURVEYS["ZTF"]


class Commands(monitoring.CommandListener):
    """The commands a client sent (names), for counting round trips."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.updates: list[Doc] = []  # the update statements sent

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)
        if event.command_name == "update":
            self.updates.extend(event.command.get("updates", []))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def aux(mongo_uri: str) -> AsyncIterator[tuple[AsyncCollection[Doc], Commands]]:
    """An empty aux collection of its own, on a client whose commands are recorded."""
    commands = Commands()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri, event_listeners=[commands])
    coll = client[f"archive_{uuid.uuid4().hex[:8]}"]["ZTF_alerts_aux"]
    try:
        yield coll, commands
    finally:
        await client.drop_database(coll.database.name)
        await client.close()


def batch() -> list[Parts]:
    """The bundled real ZTF alerts, as the pipeline splits them."""
    return [split(ZTF, record) for record in decoded_alerts()]


async def no_matches(
    positions: list[tuple[float, float]], wanted: list[set[str]]
) -> list[dict[str, list[Doc]]]:
    return [{} for _ in positions]


def objects(parts: list[Parts]) -> set[str]:
    return {p.alert["objectId"] for p in parts}


async def histories(coll: AsyncCollection[Doc]) -> dict[str, list[float]]:
    """The stored detections (jd) per object."""
    docs = await coll.find({}, {"prv_candidates.jd": 1}).to_list()
    return {d["_id"]: sorted(p["jd"] for p in d["prv_candidates"]) for d in docs}


async def test_a_batch_is_written_in_one_bulk(
    aux: tuple[AsyncCollection[Doc], Commands],
) -> None:
    coll, commands = aux
    parts = batch()
    counts = await archive.store_aux(coll, ZTF, parts, [], no_matches)
    assert counts == {"new_objects": len(objects(parts)), "updated_objects": 0}
    # one read of the stored documents, one bulk of inserts: whatever the batch size
    assert commands.names == ["find", "insert"]

    commands.names.clear()
    again = await archive.store_aux(coll, ZTF, parts, [], no_matches)
    assert again == {"new_objects": 0, "updated_objects": len(objects(parts))}
    assert commands.names == ["find", "update"]


async def test_writing_a_batch_again_adds_no_history(
    aux: tuple[AsyncCollection[Doc], Commands],
) -> None:
    coll, _ = aux
    parts = batch()
    await archive.store_aux(coll, ZTF, parts, [], no_matches)
    first = await histories(coll)
    await archive.store_aux(coll, ZTF, parts, [], no_matches)
    assert await histories(coll) == first
    assert set(first) == objects(parts)
    for part in parts:  # every alert's own detection is in its object's history
        assert part.alert["candidate"]["jd"] in first[part.alert["objectId"]]


async def test_concurrent_writers_of_the_same_objects_lose_nothing(
    aux: tuple[AsyncCollection[Doc], Commands],
) -> None:
    """Writers racing on the same objects: each object is inserted once, every lost race is read
    and merged again, and the history is the union of what every writer carried."""
    coll, _ = aux
    parts = batch()
    # each writer carries only some of the alerts, so a lost merge would lose detections
    shares = [parts[i::4] for i in range(4)] * 2
    results = await asyncio.gather(
        *(archive.store_aux(coll, ZTF, share, [], no_matches) for share in shares)
    )
    alone_coll = coll.database["alone"]
    await archive.store_aux(alone_coll, ZTF, parts, [], no_matches)
    assert await histories(coll) == await histories(alone_coll)
    assert sum(r["new_objects"] for r in results) == len(objects(parts))
    written = sum(r["new_objects"] + r["updated_objects"] for r in results)
    assert written == sum(len(objects(share)) for share in shares)
    revisions = {d["_rev"] for d in await coll.find({}, {"_rev": 1}).to_list()}
    assert None not in revisions


async def test_a_document_without_revision_is_updated(
    aux: tuple[AsyncCollection[Doc], Commands],
) -> None:
    """History restored from elsewhere (no `_rev`) is merged into, not duplicated or skipped."""
    coll, _ = aux
    parts = batch()
    await archive.store_aux(coll, ZTF, parts, [], no_matches)
    await coll.update_many({}, {"$unset": {"_rev": ""}})
    before = await histories(coll)
    counts = await archive.store_aux(coll, ZTF, parts, [], no_matches)
    assert counts["updated_objects"] == len(objects(parts))
    assert await histories(coll) == before


async def test_cross_matches_are_asked_once_per_batch(
    aux: tuple[AsyncCollection[Doc], Commands],
) -> None:
    coll, _ = aux
    parts = batch()
    calls: list[int] = []

    async def matcher(
        positions: list[tuple[float, float]], wanted: list[set[str]]
    ) -> list[dict[str, list[Doc]]]:
        calls.append(len(positions))
        return [{"CAT": [{"_id": i}]} for i in range(len(positions))]

    await archive.store_aux(coll, ZTF, parts, ["CAT"], matcher)
    await archive.store_aux(coll, ZTF, parts, ["CAT"], matcher)  # matched already: not asked
    assert calls == [len(objects(parts))]
    assert await coll.count_documents({"cross_matches.CAT": {"$size": 1}}) == len(objects(parts))


async def stored_documents(coll: AsyncCollection[Doc]) -> dict[Any, Doc]:
    return {d.pop("_id"): d for d in await coll.find({}, {"_rev": 0}).to_list()}


@pytest.mark.parametrize("order", ["in_order", "reversed"])
async def test_an_update_sends_only_the_new_points(
    aux: tuple[AsyncCollection[Doc], Commands], order: str
) -> None:
    """An object's next alert adds its new points with `$push` (not the whole history again):
    the stored document equals that of one batch holding both alerts. Out of order, the earlier
    alert's candidate adds fields to a stored point and the history is written whole."""
    coll, commands = aux
    parts = batch()
    counts: dict[str, int] = {}
    for part in parts:
        counts[part.alert["objectId"]] = counts.get(part.alert["objectId"], 0) + 1
    twice = sorted(obj for obj, n in counts.items() if n > 1)
    assert twice, "the bundled real ZTF alerts hold an object with two alerts"
    mine = sorted(
        (p for p in parts if p.alert["objectId"] in twice),
        key=lambda p: p.alert["candidate"]["jd"],
        reverse=order == "reversed",
    )
    for part in mine:
        commands.updates.clear()
        await archive.store_aux(coll, ZTF, [part], [], no_matches)
    (statement,) = commands.updates
    if order == "in_order":
        assert "prv_candidates" not in statement["u"]["$set"]
        assert statement["u"]["$push"]["prv_candidates"]["$each"]
    else:
        assert "$push" not in statement["u"]
        assert statement["u"]["$set"]["prv_candidates"]
    alone = coll.database["alone"]
    await archive.store_aux(alone, ZTF, mine, [], no_matches)
    got, want = await stored_documents(coll), await stored_documents(alone)
    if order == "in_order":
        assert got == want
    else:  # a point keeps the values it was stored with first (here the rounded prv copy)
        for obj, doc in want.items():
            points = got[obj]["prv_candidates"]
            assert [history_key(p) for p in points] == [
                history_key(p) for p in doc["prv_candidates"]
            ]
            assert [set(p) for p in points] == [set(p) for p in doc["prv_candidates"]]


async def test_a_point_older_than_the_stored_ones_is_pushed_in_order(
    aux: tuple[AsyncCollection[Doc], Commands],
) -> None:
    """A point that belongs before the stored ones is pushed with the server sorting it in."""
    coll, commands = aux
    part = max(batch(), key=lambda p: len(p.prv_candidates))
    await archive.store_aux(coll, ZTF, [part], [], no_matches)
    oid = part.alert["objectId"]
    whole = await stored_documents(coll)
    # the test alters the stored history: it drops one early point, as if an earlier alert
    # had not carried it
    (doc,) = await coll.find({"_id": oid}).to_list()
    dropped = doc["prv_candidates"][1]
    await coll.update_one(
        {"_id": oid},
        {"$set": {"prv_candidates": [p for p in doc["prv_candidates"] if p is not dropped]}},
    )
    commands.updates.clear()
    await archive.store_aux(coll, ZTF, [part], [], no_matches)
    (statement,) = commands.updates
    assert statement["u"]["$push"]["prv_candidates"] == {
        "$each": [dropped],
        "$sort": {"jd": 1, "fid": 1},
    }
    assert await stored_documents(coll) == whole
