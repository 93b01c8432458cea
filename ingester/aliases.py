"""Stage: cross-survey aliases. Each object of a batch is matched to the objects of the paired
surveys (`database.aliases`, e.g. LSST <-> ZTF, LSST <-> DECAM) within `radius_arcsec`, in the
paired surveys' alerts collections (2dsphere); matches are stored on both aux documents as
`aliases: {"ZTF": ["ZTF21..."], "LSST": [25401295582003262]}` with `$addToSet` (idempotent).

One `$or` cone query per paired survey per chunk of positions (kowalski/cones.py). Run after the
batch's alerts are stored: of two concurrent batches of paired surveys, the one that queries
last sees the other's alerts, so a pair is linked whatever the order of ingestion.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from kowalski import cones
from kowalski.config import Config
from kowalski.documents import Doc
from kowalski.surveys import SURVEYS, Survey


def object_positions(survey: Survey, alerts: Sequence[Doc]) -> dict[Any, tuple[float, float]]:
    """One position per object of the batch (its first alert's)."""
    out: dict[Any, tuple[float, float]] = {}
    for alert in alerts:
        out.setdefault(
            alert[survey.object_key], (alert["candidate"]["ra"], alert["candidate"]["dec"])
        )
    return out


async def matches_in(
    db: AsyncDatabase[Doc],
    cfg: Config,
    other: Survey,
    positions: list[tuple[float, float]],
    radius_rad: float,
) -> list[set[Any]]:
    """For each position, the object ids of `other` within the radius."""
    coll = db[other.alerts_collection(cfg)]
    projection = {other.object_key: 1, cones.GEO_FIELD: 1, "_id": 0}

    async def find(query: Doc, sort: cones.Sort | None) -> list[Doc]:
        return await coll.find(query, projection, sort=sort).to_list()

    found = await cones.search(find, positions, radius_rad, cells=await cones.has_cells(coll))
    return [{doc[other.object_key] for doc, _ in hits} for hits in found]


async def link(db: AsyncDatabase[Doc], cfg: Config, survey: Survey, alerts: Sequence[Doc]) -> int:
    """Store the aliases of the batch's objects (both directions); returns the links written."""
    partners = [SURVEYS[name] for name in cfg.database.aliases.partners(survey.name)]
    if not partners or not alerts:
        return 0
    positions = object_positions(survey, alerts)
    oids = list(positions)
    radius = math.radians(cfg.database.aliases.radius_arcsec / 3600.0)
    links = 0
    for other in partners:
        found = await matches_in(db, cfg, other, [positions[o] for o in oids], radius)
        mine: dict[Any, set[Any]] = {}
        theirs: dict[Any, set[Any]] = defaultdict(set)
        for oid, ids in zip(oids, found, strict=True):
            if ids:
                mine[oid] = ids
                for other_id in ids:
                    theirs[other_id].add(oid)
        await _add(db[survey.aux_collection(cfg)], other.name, mine)
        await _add(db[other.aux_collection(cfg)], survey.name, theirs)
        links += sum(len(ids) for ids in mine.values())
    return links


async def _add(aux: Any, survey_name: str, aliases: dict[Any, set[Any]]) -> None:
    if not aliases:
        return
    ops = [
        UpdateOne(
            {"_id": oid},
            {"$addToSet": {f"aliases.{survey_name}": {"$each": sorted(ids, key=str)}}},
        )
        for oid, ids in aliases.items()
    ]
    await aux.bulk_write(ops, ordered=False)
