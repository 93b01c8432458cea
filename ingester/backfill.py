"""The back-fill runner: claims filter back-fill jobs (`kowalski/backfill.py`) and runs them.

It runs the filter exactly as the live filter stage does (`ingester/filters.py`): the upstream
stages with the job's permissions, the version's pipeline, `ingester.filter_max_time_ms` per alert
of a batch, and the same failure handling (a failing batch is split down to single alerts, each
retried; only an alert that still fails is recorded failed; database-unavailable errors leave the
job to be resumed). Each alert sees its history as of its own detection, as the live path saw it.

    python -m ingester.backfill worker [--until-idle SECONDS]   # a dedicated runner
    python -m ingester.backfill run FILTER_ID --start S --end E  # one job, with a progress bar
    python -m ingester.backfill run --job JOB_ID                 # resume (or watch) a job

`python -m ingester` also runs jobs, in a thread (`backfill.in_ingester`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, OperationFailure

from ingester.archive import database_unavailable, insert_ignoring_duplicates
from ingester.backfill_outputs import OutputError, deliver
from ingester.filters import FilterOutcome, FilterTemplate, run_resilient
from kowalski import backfill
from kowalski.config import Config, load_config_or_exit
from kowalski.documents import Doc, utcnow
from kowalski.surveys import survey_for_collection

Progress = Callable[[Doc], None]
log = logging.getLogger("kowalski.ingester.backfill")


def runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def template(job: Doc, filter_doc: Doc) -> FilterTemplate:
    """The job's filter version as the live stage would run it (passes only: no autosave or
    follow-up), with history as of each alert."""
    fid, pipeline = backfill.filter_version(filter_doc, job["fid"])
    return FilterTemplate(
        filter_id=job["filter_id"],
        group_id=int(filter_doc.get("group_id") or job.get("group_id") or 0),
        fid=fid,
        catalog=job["catalog"],
        permissions=list(job["permissions"]),
        pipeline=pipeline,
        as_of=True,
    )


def pass_records(job: Doc, alerts: list[Doc], outcome: FilterOutcome, object_key: str) -> list[Doc]:
    """One record per alert that passed (with the filter's output) or failed (with the error),
    keyed by job and candid: a batch redone after a crash records each once."""
    at = utcnow()
    records = []
    for alert in alerts:
        candid = int(alert["candid"])
        if candid in outcome.passed:
            outcome_fields: Doc = {"state": backfill.PASSED, "data": outcome.passed[candid]}
        elif candid in outcome.failed:
            outcome_fields = {"state": backfill.FAILED, "error": outcome.failed[candid]}
        else:
            continue
        records.append(
            {
                "_id": f"{job['_id']}:{candid}",
                "job_id": job["_id"],
                **{k: job.get(k) for k in ("filter_id", "fid", "group_id", "catalog", "owner")},
                "candid": candid,
                "objectId": alert.get(object_key),
                "jd": alert["candidate"]["jd"],
                **outcome_fields,
                "at": at,
            }
        )
    return records


def _batch_size(cfg: Config, job: Doc, scanned: int) -> int:
    cap = job.get("max_alerts")
    size = cfg.backfill.batch_size
    return size if cap is None else min(size, int(cap) - scanned)


async def run_job(
    db: AsyncDatabase[Doc], cfg: Config, job: Doc, runner: str, progress: Progress | None = None
) -> str:
    """Run a job this runner holds from its checkpoint to the end; its final state, or RUNNING
    when it stopped being this runner's (cancelled or taken over)."""
    filter_doc = await db[cfg.database.collection("filters")].find_one(
        {"filter_id": job["filter_id"]}
    )
    try:
        if filter_doc is None:
            raise backfill.BackfillError(f"filter {job['filter_id']} no longer exists")
        flt = template(job, filter_doc)
    except ValueError as exc:
        await backfill.finish(db, cfg, job["_id"], runner, backfill.FAILED, str(exc))
        return backfill.FAILED
    survey = survey_for_collection(cfg.database.collections, job["catalog"])
    object_key = survey.object_key if survey else "objectId"
    alerts, passes = db[job["catalog"]], db[backfill.passes_collection(cfg)]
    jd_range = (float(job["start_jd"]), float(job["end_jd"]))
    after, scanned = job.get("last"), int(job.get("scanned", 0))
    while (size := _batch_size(cfg, job, scanned)) > 0:
        started = time.monotonic()
        query = backfill.scan_query(cfg, job["catalog"], flt.permissions, jd_range, after)
        projection = {"_id": 0, "candid": 1, "candidate.jd": 1, object_key: 1}
        batch = await alerts.find(query, projection).sort(backfill.TIME_ORDER).limit(size).to_list()
        if not batch:
            break
        outcome = await run_resilient(db, cfg, flt, [int(a["candid"]) for a in batch])
        await insert_ignoring_duplicates(passes, pass_records(job, batch, outcome, object_key))
        if survey is not None:  # before the checkpoint: a batch not delivered is redone
            await deliver(db, cfg, job, survey, flt, filter_doc, alerts, outcome)
        after = {"jd": batch[-1]["candidate"]["jd"], "candid": int(batch[-1]["candid"])}
        counts = {
            "scanned": len(batch),
            "passed": len(outcome.passed),
            "failed": len(outcome.failed),
            "retries": outcome.retries,
            "batches": 1,
            "db_ms": (time.monotonic() - started) * 1000.0,
        }
        if not await backfill.checkpoint(db, cfg, job["_id"], runner, after, counts):
            log.info("back-fill %s is no longer ours (cancelled or taken over)", job["_id"])
            return backfill.RUNNING
        scanned += len(batch)
        if progress is not None:
            progress({"scanned": scanned, "passed": len(outcome.passed)})
    await backfill.finish(db, cfg, job["_id"], runner, backfill.DONE)
    return backfill.DONE


async def run_claimed(
    db: AsyncDatabase[Doc], cfg: Config, job: Doc, runner: str, progress: Progress | None = None
) -> str:
    """`run_job`, with errors made visible: the database being unavailable leaves the job to be
    resumed (its lease expires); anything else fails the job with the error."""
    try:
        return await run_job(db, cfg, job, runner, progress)
    except OutputError as exc:
        log.warning("back-fill %s: output failed, resumed later: %s", job["_id"], exc)
        return backfill.RUNNING
    except (ConnectionFailure, OperationFailure) as exc:
        if isinstance(exc, ConnectionFailure) or database_unavailable(exc):
            log.warning("back-fill %s interrupted, resumed later: %s", job["_id"], exc)
            return backfill.RUNNING
        error = f"{type(exc).__name__}: {exc}"
        log.error("back-fill %s failed: %s", job["_id"], error)
        await backfill.finish(db, cfg, job["_id"], runner, backfill.FAILED, error)
        return backfill.FAILED


async def work(
    db: AsyncDatabase[Doc],
    cfg: Config,
    stop: threading.Event,
    until_idle: float | None = None,
) -> int:
    """Claim and run jobs until `stop` is set (or nothing was claimable for `until_idle`
    seconds); how many jobs it ran."""
    runner, ran, idle_since = runner_id(), 0, time.monotonic()
    if cfg.database.build_indexes:
        await backfill.ensure_indexes(db, cfg)
    while not stop.is_set():
        try:
            job = await backfill.claim(db, cfg, runner)
        except ConnectionFailure as exc:
            log.warning("back-fill runner: database unavailable: %s", exc)
            job = None
        if job is not None:
            log.info("back-fill %s: filter %s (%s)", job["_id"], job["filter_id"], job["fid"])
            state = await run_claimed(db, cfg, job, runner)
            log.info("back-fill %s: %s", job["_id"], state)
            ran, idle_since = ran + 1, time.monotonic()
            continue
        if until_idle is not None and time.monotonic() - idle_since >= until_idle:
            break
        await asyncio.to_thread(stop.wait, cfg.backfill.poll_s)
    return ran


async def _with_db(cfg: Config, body: Callable[[AsyncDatabase[Doc]], Any]) -> Any:
    from kowalski.db import async_client

    client = async_client(cfg)
    try:
        return await body(client[cfg.database.db])
    finally:
        await client.close()


class BackfillThread:
    """The runner on its own event loop in a thread of the ingester process."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self._main, name="backfill", daemon=True)

    def start(self) -> BackfillThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the batch in progress (its checkpoint lets another runner resume)."""
        self.stop_event.set()
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(_with_db(self.cfg, lambda db: work(db, self.cfg, self.stop_event)))
        except Exception:  # the ingester goes on; the jobs wait for another runner
            log.exception("back-fill runner stopped")


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ingester.backfill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="claim and run back-fill jobs")
    worker.add_argument("--until-idle", type=float, help="stop after this many idle seconds")
    run = sub.add_parser("run", help="run one back-fill here, with a progress bar")
    run.add_argument("filter_id", type=int, nargs="?")
    run.add_argument("--start", help="JD or ISO date (UTC)")
    run.add_argument("--end", help="JD or ISO date (UTC)")
    run.add_argument("--fid", help="filter version (default: the active one)")
    run.add_argument("--max-alerts", type=int, help="stop after this many alerts")
    run.add_argument("--job", help="resume or watch this job instead")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


async def _new_job(
    db: AsyncDatabase[Doc], cfg: Config, args: argparse.Namespace, runner: str
) -> Doc:
    if args.filter_id is None or args.start is None or args.end is None:
        raise backfill.BackfillError("give FILTER_ID --start --end, or --job JOB_ID")
    doc = await db[cfg.database.collection("filters")].find_one({"filter_id": args.filter_id})
    if doc is None:
        raise backfill.BackfillError(f"Filter id {args.filter_id} not found")
    jd_range = (
        backfill.julian_date(_number_or_text(args.start), "--start"),
        backfill.julian_date(_number_or_text(args.end), "--end"),
    )
    return await backfill.create_job(
        db,
        cfg,
        doc,
        owner=cfg.server.admin_username,
        admin=True,
        allowed=None,
        jd_range=jd_range,
        fid=args.fid,
        max_alerts=args.max_alerts,
        runner=runner,
    )


async def _run_command(db: AsyncDatabase[Doc], cfg: Config, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    runner = runner_id()
    jobs = db[backfill.jobs_collection(cfg)]
    if cfg.database.build_indexes:
        await backfill.ensure_indexes(db, cfg)
    if args.job:
        job = await jobs.find_one({"_id": args.job})
        if job is None:
            raise backfill.BackfillError(f"no back-fill job {args.job}")
    else:
        job = await _new_job(db, cfg, args, runner)
    print(f"back-fill job {job['_id']}: filter {job['filter_id']} ({job['fid']})", file=sys.stderr)
    bar = tqdm(
        total=backfill.target(job),
        initial=int(job.get("scanned", 0)),
        unit="alert",
        desc=f"filter {job['filter_id']}",
        disable=args.no_progress,
    )
    passed = int(job.get("passed", 0))

    def progress(step: Doc) -> None:
        nonlocal passed
        passed += step["passed"]
        bar.update(step["scanned"] - bar.n)
        bar.set_postfix(passed=passed)

    try:
        while job["state"] in backfill.ACTIVE:
            mine = job if job.get("lease_owner") == runner else None
            mine = mine or await backfill.claim(db, cfg, runner, job["_id"])
            if mine is not None:
                await run_claimed(db, cfg, mine, runner, progress)
            else:  # another runner holds it: show its progress
                await asyncio.sleep(cfg.backfill.poll_s)
            job = await jobs.find_one({"_id": job["_id"]}) or job
            progress({"scanned": int(job.get("scanned", 0)), "passed": 0})
    finally:
        bar.close()
    final = backfill.status(job)
    print(
        f"back-fill {final['job_id']}: {final['state']}, {final['scanned']} alerts scanned, "
        f"{final['passed']} passed, {final['failed']} failed "
        f"(passes in {backfill.passes_collection(cfg)}, job_id {final['job_id']})"
        + (f": {final['error']}" if final["error"] else "")
    )
    return 0 if final["state"] == backfill.DONE else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config_or_exit()
    logging.basicConfig(
        level=cfg.misc.logging_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "worker":
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            ran = asyncio.run(_with_db(cfg, lambda db: work(db, cfg, stop, args.until_idle)))
            log.info("back-fill runner: %d job(s) run", ran)
            return 0
        return int(asyncio.run(_with_db(cfg, lambda db: _run_command(db, cfg, args))))
    except backfill.BackfillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: resume with `run --job JOB_ID`, or a runner resumes it", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
