"""Explain a filter before activating it: its full pipeline (upstream stages with the caller's
permissions, then the user's stages) run prefix by prefix on a sample of the archive, each alert
with its history as of its own detection (as a back-fill runs it).

For every stage: the documents left after it and the time the prefix up to it took (a stage's
own time is the difference to the prefix before it: the database runs each prefix from the
start). Then the passes (the alerts with exactly one output, as the live filter stage counts
them), per night, and against another version (the active one) the passes gained and lost.
"""

from __future__ import annotations

import time
from collections import Counter

from pymongo.asynchronous.database import AsyncDatabase

from kowalski import backfill
from kowalski.config import Config
from kowalski.documents import Doc
from kowalski.filtering import full_pipeline, run_pipeline


async def sample(
    db: AsyncDatabase[Doc],
    cfg: Config,
    catalog: str,
    permissions: list[int],
    jd_range: tuple[float, float] | None,
    limit: int,
) -> list[Doc]:
    """The first `limit` alerts of the range in time order ({candid, candidate.jd}), or without a
    range the latest `limit` alerts; only alerts the permissions let the filter see."""
    everything = (float("-inf"), float("inf"))
    query = backfill.scan_query(cfg, catalog, permissions, jd_range or everything)
    order = backfill.TIME_ORDER if jd_range else [(k, -1) for k, _ in backfill.TIME_ORDER]
    projection = {"_id": 0, "candid": 1, "candidate.jd": 1}
    found = await db[catalog].find(query, projection).sort(order).limit(limit).to_list()
    return found if jd_range else found[::-1]


def stage_label(index: int, stage: Doc, upstream: int) -> str:
    operator = next(iter(stage))
    origin = "upstream" if index < upstream else f"filter[{index - upstream}]"
    return f"{origin} {operator}"


async def stage_counts(
    db: AsyncDatabase[Doc], catalog: str, full: list[Doc], upstream: int, max_time_ms: int
) -> list[Doc]:
    """Documents left after each stage (prefix + `$count`) and the time of each prefix."""
    out: list[Doc] = []
    previous_ms = 0.0
    for end in range(1, len(full) + 1):
        started = time.monotonic()
        cursor = await db[catalog].aggregate(
            [*full[:end], {"$count": "n"}], allowDiskUse=False, maxTimeMS=max_time_ms
        )
        counted = await cursor.to_list()
        prefix_ms = (time.monotonic() - started) * 1000.0
        out.append(
            {
                "index": end - 1,
                "stage": stage_label(end - 1, full[end - 1], upstream),
                "docs": int(counted[0]["n"]) if counted else 0,
                "prefix_ms": round(prefix_ms, 2),
                "stage_ms": round(max(0.0, prefix_ms - previous_ms), 2),
            }
        )
        previous_ms = prefix_ms
    return out


async def explain(
    db: AsyncDatabase[Doc],
    cfg: Config,
    catalog: str,
    permissions: list[int],
    pipeline: list[Doc],
    *,
    jd_range: tuple[float, float] | None,
    limit: int,
    max_time_ms: int,
    compare: tuple[str, list[Doc]] | None = None,
) -> Doc:
    """The explanation of `pipeline` on a sample; `compare`: (fid, pipeline) of the version to
    compare the passes with."""
    alerts = await sample(db, cfg, catalog, permissions, jd_range, limit)
    candids = [int(a["candid"]) for a in alerts]
    full = full_pipeline(cfg, catalog, permissions, pipeline, candids, as_of=True)
    stages = await stage_counts(db, catalog, full, len(full) - len(pipeline), max_time_ms)
    per_alert_ms = cfg.ingester.filter_max_time_ms

    async def passes_of(user_pipeline: list[Doc]) -> list[int]:
        found = await run_pipeline(
            db, cfg, catalog, permissions, user_pipeline, candids, per_alert_ms, as_of=True
        )
        return sorted(found)

    passed = await passes_of(pipeline)
    nights = {int(a["candid"]): backfill.night_of(a["candidate"]["jd"]) for a in alerts}
    result: Doc = {
        "catalog": catalog,
        "permissions": permissions,
        "sample": {
            "alerts": len(alerts),
            "limit": limit,
            "start_jd": alerts[0]["candidate"]["jd"] if alerts else None,
            "end_jd": alerts[-1]["candidate"]["jd"] if alerts else None,
            "nights": dict(sorted(Counter(nights.values()).items())),
        },
        "stages": stages,
        "passes": {
            "count": len(passed),
            "per_night": dict(sorted(Counter(nights[c] for c in passed).items())),
            "candids": passed,
        },
    }
    if compare is not None:
        fid, other = compare
        theirs = set(await passes_of(other))
        result["compared_with"] = {
            "fid": fid,
            "passes": len(theirs),
            "gained": sorted(set(passed) - theirs),
            "lost": sorted(theirs - set(passed)),
        }
    return result
