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
from kowalski.documents import Doc, utcnow

PENDING, DONE, FAILED = "pending", "done", "failed"


def outbox_name(cfg: Config) -> str:
    return cfg.database.collection("skyportal_outbox")


def objects_name(cfg: Config) -> str:
    return cfg.database.collection("skyportal_objects")


def setup_name(cfg: Config) -> str:
    return cfg.database.collection("skyportal_setup")


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


async def save_setup_states(
    db: AsyncDatabase[Doc], cfg: Config, setup: Any, next_check: dt.datetime
) -> None:
    """One document per survey of a `FeedSetup`: ready, or waiting (reason, next check)."""
    now = utcnow()
    states = [
        ({"state": "ready", "reason": None, "next_check_at": None}, name) for name in setup.surveys
    ] + [
        ({"state": "waiting", "reason": reason, "next_check_at": next_check}, name)
        for name, reason in setup.waiting.items()
    ]
    for fields, name in states:
        await db[setup_name(cfg)].update_one(
            {"_id": name}, {"$set": {**fields, "checked_at": now}}, upsert=True
        )


async def status(db: AsyncDatabase[Doc], cfg: Config) -> Doc:
    """Pending/failed/done counts per survey and kind, the surveys' set-up states and the oldest
    pending entry."""
    outbox = db[outbox_name(cfg)]
    counts: dict[str, dict[str, int]] = {}
    key = {"survey": "$survey", "kind": "$kind", "state": "$state"}
    groups = await outbox.aggregate([{"$group": {"_id": key, "n": {"$sum": 1}}}])
    for doc in await groups.to_list():
        kind = f"{doc['_id'].get('survey')} {doc['_id'].get('kind')}"
        state = str(doc["_id"].get("state"))
        counts.setdefault(kind, {PENDING: 0, FAILED: 0, DONE: 0})[state] = int(doc["n"])
    setups = await db[setup_name(cfg)].find({}).sort("_id", ASCENDING).to_list()
    oldest = await outbox.find_one(
        {"state": PENDING},
        {"body": 0},
        sort=[("created_at", ASCENDING)],
    )
    return {"counts": counts, "oldest_pending": oldest, "setup": setups}


def format_status(report: Doc) -> str:
    lines = []
    for state in report.get("setup", []):
        if state.get("state") == "ready":
            lines.append(f"{state['_id']}: ready")
        else:
            when = state.get("next_check_at")
            at = f"; next try {when:%Y-%m-%d %H:%M:%S} UTC" if when else ""
            lines.append(f"{state['_id']}: WAITING: {state.get('reason')}{at}")
    lines.append(f"{'survey kind':<20} {'pending':>8} {'failed':>8} {'done':>8}")
    for kind, c in sorted(report["counts"].items()):
        lines.append(f"{kind:<20} {c[PENDING]:>8} {c[FAILED]:>8} {c[DONE]:>8}")
    if not report["counts"]:
        lines.append("(the outbox is empty)")
    else:
        totals = [
            sum(c[state] for c in report["counts"].values()) for state in (PENDING, FAILED, DONE)
        ]
        lines.append(f"{'total':<20} {totals[0]:>8} {totals[1]:>8} {totals[2]:>8}")
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
