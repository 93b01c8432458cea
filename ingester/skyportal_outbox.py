"""The durable outbox of posts to SkyPortal, and the per-object feed state.

`skyportal_outbox`: one document per post the feed decided to make:
  _id        "<survey>:<candid>:<kind>:<key>" (deterministic: deciding an alert again is a no-op)
  survey, obj_id, candid, seq (order per object), kind, body (+ kind-specific fields),
  state      pending -> done | failed
  attempts, last_error, next_attempt_at, lease_until (a delivery in progress), created_at,
  done_at, result (what delivery learned, e.g. groups not saved to).
`skyportal_objects`: per object (_id "<survey>:<obj_id>"): `first_candid` (the alert that made it
a candidate: inserted once, so two workers never both post an object as new), `last_jd` per stream
and origin (what SkyPortal was sent), `seq` (last sequence number used).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from ingester.archive import insert_ignoring_duplicates
from kowalski.config import Config

Doc = dict[str, Any]
OUTBOX = "skyportal_outbox"
OBJECTS = "skyportal_objects"
PENDING, DONE, FAILED = "pending", "done", "failed"


def outbox_name(cfg: Config) -> str:
    return cfg.database.collections.get(OUTBOX, OUTBOX)


def objects_name(cfg: Config) -> str:
    return cfg.database.collections.get(OBJECTS, OBJECTS)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


async def ensure_indexes(db: AsyncDatabase[Doc], cfg: Config) -> None:
    outbox = db[outbox_name(cfg)]
    await outbox.create_index(
        [("state", ASCENDING), ("next_attempt_at", ASCENDING)], name="state_due"
    )
    await outbox.create_index(
        [("obj_id", ASCENDING), ("state", ASCENDING), ("seq", ASCENDING)], name="obj_state_seq"
    )


async def insert_entries(db: AsyncDatabase[Doc], cfg: Config, entries: Sequence[Doc]) -> int:
    """One bulk write; entries decided before (same _id) are kept as they are."""
    return await insert_ignoring_duplicates(db[outbox_name(cfg)], entries)


async def status(db: AsyncDatabase[Doc], cfg: Config) -> Doc:
    """Pending/failed/done counts per kind and the oldest pending entry."""
    outbox = db[outbox_name(cfg)]
    counts: dict[str, dict[str, int]] = {}
    groups = await outbox.aggregate(
        [{"$group": {"_id": {"kind": "$kind", "state": "$state"}, "n": {"$sum": 1}}}]
    )
    for doc in await groups.to_list():
        kind, state = str(doc["_id"].get("kind")), str(doc["_id"].get("state"))
        counts.setdefault(kind, {PENDING: 0, FAILED: 0, DONE: 0})[state] = int(doc["n"])
    oldest = await outbox.find_one(
        {"state": PENDING},
        {"body": 0},
        sort=[("created_at", ASCENDING)],
    )
    return {"counts": counts, "oldest_pending": oldest}


def format_status(report: Doc) -> str:
    lines = [f"{'kind':<12} {'pending':>8} {'failed':>8} {'done':>8}"]
    for kind, c in sorted(report["counts"].items()):
        lines.append(f"{kind:<12} {c[PENDING]:>8} {c[FAILED]:>8} {c[DONE]:>8}")
    if len(lines) == 1:
        lines.append("(the outbox is empty)")
    else:
        totals = [
            sum(c[state] for c in report["counts"].values()) for state in (PENDING, FAILED, DONE)
        ]
        lines.append(f"{'total':<12} {totals[0]:>8} {totals[1]:>8} {totals[2]:>8}")
    oldest = report["oldest_pending"]
    if oldest:
        lines.append(
            f"oldest pending: {oldest['_id']} (object {oldest['obj_id']}, since "
            f"{oldest['created_at']:%Y-%m-%d %H:%M:%S} UTC, {oldest['attempts']} attempts"
            + (f", last error: {oldest['last_error']}" if oldest.get("last_error") else "")
            + ")"
        )
    else:
        lines.append("oldest pending: none")
    return "\n".join(lines)
