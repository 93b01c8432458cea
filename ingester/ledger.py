"""The completion ledger: one record per alert once the whole pipeline ran on it (stored,
filtered, handed off), written at the end of a batch. Only alerts with a record are skipped as
duplicates when a batch comes again, so a batch re-delivered after a crash anywhere before the end
is processed again from the start (every stage tolerates that: see `ingester/archive.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from ingester.archive import insert_ignoring_duplicates
from kowalski.config import Config
from kowalski.documents import Doc
from kowalski.surveys import Survey


def handoffs_collection(cfg: Config) -> str:
    return cfg.database.collection("handoffs")


def _ledger_id(survey: Survey, candid: int) -> str:
    return f"{survey.name}:{candid}"


async def completed(
    ledger: AsyncCollection[Doc], survey: Survey, candids: Sequence[int]
) -> set[int]:
    """Alerts of `candids` that went through the whole pipeline before (true duplicates)."""
    ids = [_ledger_id(survey, c) for c in candids]
    docs = await ledger.find({"_id": {"$in": ids}}, {"_id": 0, "candid": 1}).to_list()
    return {int(d["candid"]) for d in docs}


async def record(
    ledger: AsyncCollection[Doc],
    survey: Survey,
    candids: Sequence[int],
    passed: dict[int, list[Doc]],
    at: Any,
) -> None:
    """One ledger record per alert once filters and hand-off ran: the filters it passed."""
    docs = [
        {
            "_id": _ledger_id(survey, c),
            "survey": survey.name,
            "candid": c,
            "filters": [{"filter_id": e["filter_id"], "fid": e["fid"]} for e in passed.get(c, [])],
            "handed_off_at": at,
        }
        for c in candids
    ]
    if docs:
        await insert_ignoring_duplicates(ledger, docs)
