"""Stage: store a batch: dedup (one query), per-object history (aux) merged and written in one
bulk with optimistic concurrency (a revision per document), alerts inserted in bulk.

Order matters for crash safety: aux first (its merges are idempotent), then alerts (a unique
candid: inserting one again is a no-op). An alert is complete only once the whole pipeline ran on
it (filters, hand-off): the completion ledger (`ingester/ledger.py`) gets one record per alert at
the end of a batch, and only alerts with such a record are skipped as duplicates. A batch
re-delivered after a crash anywhere before that point is therefore processed again from the start,
which every stage tolerates (idempotent merges and inserts, filter runs recorded once).

Cross-matching: a catalog missing from an object's `cross_matches` (never matched, or its query
failed) is matched with the object's next alert; a failed query is never stored as "no match".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bson import ObjectId
from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, OperationFailure

from ingester.mongify import (
    FP_SORT,
    HISTORY_SORT,
    Parts,
    history_key,
    keep_fp_hists_for_new_object,
    merge_fp_hists,
    merge_prv_candidates,
)
from kowalski.config import Config
from kowalski.documents import Doc
from kowalski.surveys import Survey

# (positions, catalogs wanted per position) -> {catalog: matches} per position
CrossMatcher = Callable[
    [list[tuple[float, float]], list[set[str]]], Awaitable[list[dict[str, list[Doc]]]]
]
MAX_ATTEMPTS = 20
# a batch's reads ask for every document in the first reply (up to the server's 16 MB), not the
# default 101 documents followed by `getMore` round trips
ONE_REPLY = 100_000
# server states (shutdown, step-down, not primary), not faults of a query: the batch is retried
SERVER_STATE_CODES = frozenset({91, 189, 10107, 11600, 11602, 13435, 13436})


def database_unavailable(exc: OperationFailure) -> bool:
    """An error that says the server cannot answer now, whatever the query."""
    return exc.code in SERVER_STATE_CODES


def group_by_object(survey: Survey, parts: Sequence[Parts]) -> dict[Any, list[Parts]]:
    """Parts per object id, as stored (a string for ZTF, an integer diaObjectId for LSST), so
    that the aux `_id` equals the alerts' object key (filters `$lookup` on it)."""
    groups: dict[Any, list[Parts]] = defaultdict(list)
    for part in parts:
        groups[part.alert[survey.object_key]].append(part)
    return groups


def _new_history(survey: Survey, group: list[Parts]) -> tuple[list[Doc], list[Doc]]:
    prv: list[Doc] = []
    fp: list[Doc] = []
    for part in sorted(group, key=lambda p: p.alert["candidate"]["jd"]):
        prv = merge_prv_candidates(prv, part.prv_candidates, survey.history_key)
        fp = merge_fp_hists(fp, part.fp_hists)
    return prv, fp


def _latest_fields(group: list[Parts], stored: Doc | None) -> Doc:
    """The aux fields the group's most recent alert sets (LSST: diaObject), with `latest_jd`;
    empty when the stored document already holds fields of a later alert (order-independent)."""
    newest = max(group, key=lambda p: p.alert["candidate"]["jd"])
    jd = newest.alert["candidate"]["jd"]
    if not newest.latest or (stored or {}).get("latest_jd", -math.inf) > jd:
        return {}
    return {**newest.latest, "latest_jd": jd}


async def store_aux(
    aux: AsyncCollection[Doc],
    survey: Survey,
    parts: Sequence[Parts],
    catalogs: Sequence[str],
    cross_match: CrossMatcher,
) -> dict[str, int]:
    """Merge the batch into `<survey>_alerts_aux`; returns counts of new/updated objects.

    Per batch, when nobody else writes the same objects: one `find` of the stored documents, the
    cross-matches (ingester/xmatch.py), one unordered `bulk_write` of every object's insert or
    revision-checked update. Objects another writer changed in between are read
    and merged again (idempotent merges), up to MAX_ATTEMPTS times."""
    groups = group_by_object(survey, parts)
    pending = dict(groups)
    counts = {"new_objects": 0, "updated_objects": 0}
    for _ in range(MAX_ATTEMPTS):
        if not pending:
            return counts
        found = aux.find({"_id": {"$in": list(pending)}}, batch_size=ONE_REPLY)
        stored = {d["_id"]: d for d in await found.to_list()}
        # cross-match objects that are new, or lack a catalog configured since they were stored
        need = {
            oid: set(catalogs) - set((stored.get(oid) or {}).get("cross_matches", {}))
            for oid in pending
        }
        todo = [oid for oid, missing in need.items() if missing]
        positions = [
            (pending[oid][0].alert["candidate"]["ra"], pending[oid][0].alert["candidate"]["dec"])
            for oid in todo
        ]
        matches = (
            dict(zip(todo, await cross_match(positions, [need[o] for o in todo]), strict=True))
            if todo
            else {}
        )
        revision = str(ObjectId())
        writes = {
            oid: object_write(survey, oid, group, stored.get(oid), matches.get(oid), revision)
            for oid, group in pending.items()
        }
        lost = await _write_objects(aux, writes, revision)
        for oid in writes.keys() - lost:
            counts["updated_objects" if oid in stored else "new_objects"] += 1
        pending = {oid: pending[oid] for oid in pending if oid in lost}
    raise RuntimeError(f"aux update kept conflicting for objects {sorted(pending)[:5]}")


AuxWrite = InsertOne[Doc] | UpdateOne


def object_write(
    survey: Survey,
    oid: Any,
    group: list[Parts],
    stored: Doc | None,
    new_matches: dict[str, list[Doc]] | None,
    revision: str,
) -> AuxWrite:
    """One object's aux write: an insert for a new object, else an update that applies only if
    the document is still the revision that was read (`_rev`); either sets `_rev` to `revision`."""
    prv, fp = _new_history(survey, group)
    latest = _latest_fields(group, stored)
    if stored is None:
        doc: Doc = {
            "_id": oid,
            "_rev": revision,
            "prv_candidates": prv,
            "cross_matches": new_matches or {},
            **latest,
        }
        first = min(group, key=lambda p: p.alert["candidate"]["jd"]).alert["candidate"]
        if fp and keep_fp_hists_for_new_object(first):
            doc["fp_hists"] = fp
        return InsertOne(doc)
    update: Doc = {"_rev": revision, **latest}
    push: Doc = {}
    histories: list[tuple[str, list[Doc], Callable[[Doc], Any], Doc]] = [
        (
            "prv_candidates",
            merge_prv_candidates(stored.get("prv_candidates", []), prv, survey.history_key),
            lambda p: history_key(p, survey.history_key),
            HISTORY_SORT,
        )
    ]
    if "fp_hists" in stored and fp:
        histories.append(
            ("fp_hists", merge_fp_hists(stored["fp_hists"], fp), lambda p: p["jd"], FP_SORT)
        )
    for name, merged, key, order in histories:
        added = added_points(stored.get(name, []), merged, key)
        if added is None:  # the merge changed a stored point: write the history whole
            update[name] = merged
        elif added:  # only new points: send just those, placed in order by the server
            tail = merged[len(merged) - len(added) :]
            at_end = all(a is m for a, m in zip(added, tail, strict=True))
            push[name] = {"$each": added, **({} if at_end else {"$sort": order})}
    if new_matches:
        for catalog, found in new_matches.items():
            update[f"cross_matches.{catalog}"] = found
    change: Doc = {"$set": update, **({"$push": push} if push else {})}
    # a document without `_rev` (restored from elsewhere) matches `_rev: None`
    return UpdateOne({"_id": oid, "_rev": stored.get("_rev")}, change)


def added_points(
    stored: list[Doc], merged: list[Doc], key: Callable[[Doc], Any]
) -> list[Doc] | None:
    """The points a merge adds to the stored history (in order), so that an update sends those
    alone; None when the merge changed a stored point (then the history is written whole)."""
    before = {key(p): p for p in stored}
    added = []
    for point in merged:
        old = before.get(key(point))
        if old is None:
            added.append(point)
        elif old != point:
            return None
    return added if len(merged) - len(added) == len(stored) else None


async def _write_objects(
    aux: AsyncCollection[Doc], writes: dict[Any, AuxWrite], revision: str
) -> set[Any]:
    """Apply the writes in one unordered bulk; returns the objects whose write lost a race (an
    insert of an object stored meanwhile, an update of a document changed meanwhile)."""
    oids = list(writes)
    lost: set[Any] = set()
    try:
        result = await aux.bulk_write(list(writes.values()), ordered=False)
        matched = result.matched_count
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != 11000 for e in errors):
            raise
        lost = {oids[e["index"]] for e in errors}
        matched = int(exc.details.get("nMatched", 0))
    updates = [oid for oid, op in writes.items() if isinstance(op, UpdateOne)]
    if matched < len(updates):  # some documents changed since read: ask which, in one query
        now = aux.find({"_id": {"$in": updates}}, {"_rev": 1})
        lost |= {d["_id"] for d in await now.to_list() if d.get("_rev") != revision}
    return lost


async def insert_ignoring_duplicates(coll: AsyncCollection[Doc], docs: Sequence[Doc]) -> int:
    """Bulk insert; documents already stored (unique key) are fine, any other error raises."""
    if not docs:
        return 0
    try:
        result = await coll.insert_many(list(docs), ordered=False)
        return len(result.inserted_ids)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != 11000 for e in errors):
            raise
        return int(exc.details.get("nInserted", len(docs) - len(errors)))


async def existing_candids(coll: AsyncCollection[Doc], candids: Sequence[int]) -> set[int]:
    docs = await coll.find({"candid": {"$in": list(candids)}}, {"_id": 0, "candid": 1}).to_list()
    return {int(d["candid"]) for d in docs}


async def insert_alerts(coll: AsyncCollection[Doc], docs: Sequence[Doc]) -> int:
    """Insert the alerts not stored yet (a batch redone after a crash stores each once, with or
    without a unique candid index); any error but a duplicate key raises."""
    stored = await existing_candids(coll, [d["candid"] for d in docs]) if docs else set()
    return await insert_ignoring_duplicates(coll, [d for d in docs if d["candid"] not in stored])


def prepare_database(cfg: Config, surveys: Sequence[str]) -> None:
    """Indexes of the alert collections, once, before any batch runs (not raced by workers)."""
    from kowalski.db import create_index_sync, ensure_indexes_sync, sync_client
    from kowalski.surveys import SURVEYS

    if not cfg.database.build_indexes:
        return
    with sync_client(cfg) as client:
        db = client[cfg.database.db]
        for name in surveys:
            ensure_indexes_sync(db, cfg, SURVEYS[name].alerts_collection(cfg))
        runs = db[cfg.database.collection("filter_runs")]
        create_index_sync(runs, [("filter_id", 1), ("candids", 1)], "filter_id_candids")
