"""The back-fill benchmark: after the night's runs, one back-fill job (the night's first filter,
the whole archive the night left behind) run in this process the way the ingester's runner runs
it; alerts scanned per second, from the job's own counters."""

from __future__ import annotations

import asyncio
import threading
import time

from ingester import backfill as runner
from kowalski import backfill
from kowalski.config import Config
from kowalski.db import async_client
from kowalski.documents import Doc
from kowalski.surveys import Survey

EVERY_JD = (0.0, 1e7)


async def _run(cfg: Config, survey: Survey) -> Doc:
    client = async_client(cfg)
    try:
        db = client[cfg.database.db]
        flt = await db[cfg.database.collection("filters")].find_one(
            {"catalog": survey.alerts_collection(cfg), "active": True}, sort=[("filter_id", 1)]
        )
        if flt is None:
            return {"skipped": "the night has no active filter"}
        job = await backfill.create_job(
            db, cfg, flt, owner="bench", admin=True, allowed=None, jd_range=EVERY_JD
        )
        started = time.perf_counter()
        await runner.work(db, cfg, threading.Event(), until_idle=0)
        seconds = time.perf_counter() - started
        done = await db[backfill.jobs_collection(cfg)].find_one({"_id": job["_id"]})
        assert done is not None and done["state"] == backfill.DONE, done
        return {
            "filter_id": int(flt["filter_id"]),
            "scanned": int(done["scanned"]),
            "passed": int(done["passed"]),
            "batches": int(done["batches"]),
            "seconds": seconds,
            "alerts_per_s": done["scanned"] / seconds if seconds > 0 else None,
        }
    finally:
        await client.close()


def run_backfill(cfg: Config, survey: Survey) -> Doc:
    return asyncio.run(_run(cfg, survey))


def backfill_line(result: Doc) -> str:
    if "skipped" in result:
        return f"back-fill: skipped ({result['skipped']})"
    return (
        f"back-fill (filter {result['filter_id']} over the archive, {result['batches']} batches): "
        f"{result['scanned']} alerts scanned in {result['seconds']:.1f} s = "
        f"{result['alerts_per_s']:.0f} alerts/s, {result['passed']} passed"
    )
