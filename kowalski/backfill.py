"""Filter back-fills: one filter version run over the archived alerts of a time range, as a job.

Jobs live in one collection (`database.collections.filter_backfills`, admin-only through
`/api/queries`); the API and the CLI create them, a runner (`ingester/backfill.py`: a thread of
`python -m ingester`, or `python -m ingester.backfill worker`) claims one with a lease, runs the
filter over the range in batches in time order (`candidate.jd`, then `candid`) and checkpoints
after every batch: the last (jd, candid) done and the counters, in one update that holds only
while the lease is its own. A runner that dies leaves its lease to expire and the next runner
resumes after the last checkpoint; a batch cut short is redone, and its pass records (keyed by
job and candid) are kept once.

Passes go to `database.collections.filter_backfill_passes`, one record per passing (or failed)
alert with the filter version (`fid`) and the job's owner; through `/api/queries` a user reads
only the records of their own jobs (`api/policy.py`).

Data rights: a job runs with the filter's programid permissions narrowed to those of the user
who asked for it, so nobody back-fills over alerts they may not see; the alerts scanned are
counted under the same restriction.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
from collections.abc import Sequence
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, ExecutionTimeout

from kowalski.config import FILTER_MATCH, Config
from kowalski.db import create_index
from kowalski.documents import Doc, utcnow
from kowalski.filtering import parse_pipeline, stage, upstream_stages
from kowalski.stored_filters import find_version
from kowalski.surveys import survey_for_collection

JOBS, PASSES = "filter_backfills", "filter_backfill_passes"
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
NEW = "new"  # inserted, waiting for its owner's slot (see take_slot); never claimed
NEW_GRACE_S = 60.0
ACTIVE = (QUEUED, RUNNING)
PASSED = "passed"  # state of a pass record; a failed run is recorded with FAILED
OUTPUTS = ("results", "skyportal")
TIME_ORDER = [("candidate.jd", 1), ("candid", 1)]
COUNT_MAX_TIME_MS = 30_000  # counting a range at creation; longer: the total stays unknown
UNIX_EPOCH_JD = 2440587.5


class BackfillError(ValueError):
    """A job that cannot be created or changed; the message says why."""


class TooManyJobs(BackfillError):
    """The user already has `backfill.max_jobs_per_user` jobs queued or running."""


def jobs_collection(cfg: Config) -> str:
    return cfg.database.collections.get(JOBS, JOBS)


def passes_collection(cfg: Config) -> str:
    return cfg.database.collections.get(PASSES, PASSES)


# ------------------------------------------------------------------ times


def julian_date(value: Any, field: str) -> float:
    """A JD given as a number, or an ISO date (UTC unless it says otherwise)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BackfillError(f"{field} must be a JD or an ISO date, got {value!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.timestamp() / 86400.0 + UNIX_EPOCH_JD
    raise BackfillError(f"{field} must be a JD or an ISO date")


def night_of(jd: float) -> str:
    """The UTC date of a JD (a ZTF night falls on one UTC date), e.g. `2020-02-02`."""
    moment = dt.datetime(1970, 1, 1) + dt.timedelta(days=jd - UNIX_EPOCH_JD)
    return moment.date().isoformat()


def night_range(night: str) -> tuple[float, float]:
    """The JD range of a UTC date given as `YYYYMMDD` or `YYYY-MM-DD`."""
    try:
        day = dt.date.fromisoformat(night)
    except ValueError:
        raise BackfillError(f"night must be YYYYMMDD or YYYY-MM-DD, got {night!r}") from None
    start = julian_date(day.isoformat(), "night")
    return start, start + 1.0


# ------------------------------------------------------------------ what a job runs over


def filter_version(doc: Doc, fid: str | None) -> tuple[str, list[Doc]]:
    """(fid, pipeline) of version `fid` of a filter document, by default its active version."""
    version = find_version(doc, fid)
    if version is None:
        wanted = fid if fid is not None else doc.get("active_fid")
        raise BackfillError(f"filter version fid {wanted} not in filter.fv")
    return str(version["fid"]), parse_pipeline(version["pipeline"])


def effective_permissions(
    cfg: Config, catalog: str, permissions: Sequence[int], allowed: Sequence[int] | None
) -> list[int]:
    """The filter's programids narrowed to those the user may see (`allowed`; None: all)."""
    survey = survey_for_collection(cfg.database.collections, catalog)
    if allowed is None or survey is None or not survey.programid_rights:
        return sorted(set(permissions))
    return sorted(set(permissions) & set(allowed))


def scan_query(
    cfg: Config,
    catalog: str,
    permissions: list[int],
    jd_range: tuple[float, float],
    after: Doc | None = None,
) -> Doc:
    """The archived alerts of a range the filter may see (its configured match stage without
    the batch's candids), after the checkpoint `after` ({jd, candid}) in time order."""
    match = stage(cfg, catalog, upstream_stages(cfg, catalog, permissions), FILTER_MATCH)["$match"]
    clauses: list[Doc] = [
        {k: v for k, v in match.items() if k != "candid"},
        {"candidate.jd": {"$gte": jd_range[0], "$lt": jd_range[1]}},
    ]
    if after is not None:
        jd, candid = after["jd"], after["candid"]
        clauses.append(
            {
                "$or": [
                    {"candidate.jd": {"$gt": jd}},
                    {"candidate.jd": jd, "candid": {"$gt": candid}},
                ]
            }
        )
    return {"$and": clauses}


# ------------------------------------------------------------------ jobs


async def ensure_indexes(db: AsyncDatabase[Doc], cfg: Config) -> None:
    """The indexes runners and readers use: jobs by state and owner, passes by job and owner."""
    jobs, passes = db[jobs_collection(cfg)], db[passes_collection(cfg)]
    await create_index(jobs, [("state", 1), ("created_at", 1)], "state_created_at")
    await create_index(jobs, [("owner", 1), ("state", 1)], "owner_state")
    await create_index(passes, [("job_id", 1), ("state", 1)], "job_id_state")
    await create_index(passes, [("owner", 1), ("job_id", 1)], "owner_job_id")


def new_job_id() -> str:
    return secrets.token_hex(8)


async def _count(db: AsyncDatabase[Doc], catalog: str, query: Doc) -> int | None:
    try:
        return await db[catalog].count_documents(query, maxTimeMS=COUNT_MAX_TIME_MS)
    except ExecutionTimeout:
        return None


def _cap(cfg: Config, admin: bool, max_alerts: int | None) -> int | None:
    """The most alerts the job may scan: what was asked, within the cap for non-admins."""
    if admin:
        return max_alerts
    cap = cfg.backfill.max_alerts
    if max_alerts is not None and max_alerts > cap:
        raise BackfillError(f"max_alerts may be at most {cap} (backfill.max_alerts)")
    return max_alerts or cap


async def create_job(
    db: AsyncDatabase[Doc],
    cfg: Config,
    filter_doc: Doc,
    *,
    owner: str,
    admin: bool,
    allowed: Sequence[int] | None,
    jd_range: tuple[float, float],
    fid: str | None = None,
    outputs: Sequence[str] = (),
    max_alerts: int | None = None,
    runner: str | None = None,
) -> Doc:
    """A new job over `jd_range` for `owner` (who sees programids `allowed`; None: all), queued,
    or already claimed by `runner` (the CLI runs its own job)."""
    if jd_range[1] <= jd_range[0]:
        raise BackfillError("end must be after start")
    unsupported = sorted(set(outputs) - set(OUTPUTS))
    if unsupported:
        raise BackfillError(f"unknown outputs {unsupported} (known: {list(OUTPUTS)})")
    if "skyportal" in outputs and not cfg.misc.broker:
        raise BackfillError("output skyportal needs the broker feed on (misc.broker: true)")
    if "results" in outputs and not cfg.kafka.results.enabled:
        raise BackfillError("output results needs the results stream on (kafka.results.enabled)")
    version, _ = filter_version(filter_doc, fid)
    catalog = str(filter_doc["catalog"])
    permissions = effective_permissions(cfg, catalog, filter_doc["permissions"], allowed)
    if not permissions:
        raise BackfillError("none of this filter's programids is one you may see")
    cap = _cap(cfg, admin, max_alerts)
    jobs = db[jobs_collection(cfg)]
    total = await _count(db, catalog, scan_query(cfg, catalog, permissions, jd_range))
    if not admin and max_alerts is None and (total is None or total > cfg.backfill.max_alerts):
        counted = "too many" if total is None else str(total)
        raise BackfillError(
            f"{counted} alerts in this range, more than one job may scan ({cap}): narrow the "
            "range or set max_alerts"
        )
    at = utcnow()
    job: Doc = {
        "_id": new_job_id(),
        "filter_id": filter_doc["filter_id"],
        "group_id": filter_doc.get("group_id"),
        "fid": version,
        "catalog": catalog,
        "permissions": permissions,
        "owner": owner,
        "admin": admin,
        "start_jd": jd_range[0],
        "end_jd": jd_range[1],
        "outputs": list(outputs),
        "max_alerts": cap,
        "total": total,
        "state": QUEUED if runner is None else RUNNING,
        "scanned": 0,
        "passed": 0,
        "failed": 0,
        "retries": 0,
        "batches": 0,
        "db_ms": 0.0,
        "last": None,
        "lease_owner": runner,
        "lease_until": None if runner is None else at + dt.timedelta(seconds=cfg.backfill.lease_s),
        "created_at": at,
        "updated_at": at,
        "finished_at": None,
        "error": None,
    }
    if runner is not None:
        job["started_at"] = at  # for a queued job, set when a runner first claims it ($min)
    if admin:
        await jobs.insert_one(job)
        return job
    state = job["state"]
    await jobs.insert_one({**job, "state": NEW})  # not claimable until it holds a slot
    try:
        await take_slot(db, cfg, owner, job["_id"])
    except TooManyJobs:
        await jobs.delete_one({"_id": job["_id"], "state": NEW})
        raise
    await jobs.update_one({"_id": job["_id"], "state": NEW}, {"$set": {"state": state}})
    return job


def slots_collection(cfg: Config) -> str:
    return cfg.database.collection("filter_backfill_slots")


async def _holds(db: AsyncDatabase[Doc], cfg: Config, job_id: Any) -> bool:
    """Whether a slot's job still holds it: queued or running, or being created (`NEW`, for a
    minute: a creator that died meanwhile does not keep the slot)."""
    job = await db[jobs_collection(cfg)].find_one({"_id": job_id}, {"state": 1, "created_at": 1})
    if job is None:
        return False
    if job["state"] == NEW:
        return bool(utcnow() - job["created_at"] < dt.timedelta(seconds=NEW_GRACE_S))
    return job["state"] in ACTIVE


async def take_slot(db: AsyncDatabase[Doc], cfg: Config, owner: str, job_id: str) -> None:
    """One of the owner's `backfill.max_jobs_per_user` slots (`<owner>:<n>` documents), taken
    atomically: a slot is inserted (a unique `_id`), or taken over from a job that no longer
    holds it with a compare-and-set on its job id, so two concurrent requests never both pass
    the limit. Raises TooManyJobs when every slot is held."""
    slots = db[slots_collection(cfg)]
    limit = cfg.backfill.max_jobs_per_user
    for n in range(limit):
        key = f"{owner}:{n}"
        try:
            await slots.insert_one({"_id": key, "job_id": job_id})
            return
        except DuplicateKeyError:
            pass
        held = await slots.find_one({"_id": key})
        if held is None or await _holds(db, cfg, held["job_id"]):
            continue
        taken = await slots.find_one_and_update(
            {"_id": key, "job_id": held["job_id"]}, {"$set": {"job_id": job_id}}
        )
        if taken is not None:
            return
    raise TooManyJobs(
        f"{owner} has {limit} back-fill(s) queued or running "
        f"(at most {limit}: backfill.max_jobs_per_user)"
    )


def target(job: Doc) -> int | None:
    """How many alerts the job will scan, where known."""
    known = [n for n in (job.get("total"), job.get("max_alerts")) if n is not None]
    return min(known) if known else None


def status(job: Doc, at: dt.datetime | None = None) -> Doc:
    """What `GET /api/filters/{id}/backfill` shows of a job: progress, ETA and cost."""
    at = at or utcnow()
    started, finished = job.get("started_at"), job.get("finished_at")
    elapsed = ((finished or at) - started).total_seconds() if started else 0.0
    scanned, goal = int(job.get("scanned", 0)), target(job)
    rate = scanned / elapsed if elapsed > 0 else None
    eta = None
    if job["state"] in ACTIVE and goal is not None and rate:
        eta = max(0.0, (goal - scanned) / rate)
    return {
        "job_id": job["_id"],
        **{k: job.get(k) for k in ("filter_id", "fid", "catalog", "owner", "state", "error")},
        **{k: job.get(k) for k in ("start_jd", "end_jd", "outputs", "max_alerts", "total")},
        "permissions": job.get("permissions"),
        "scanned": scanned,
        "passed": int(job.get("passed", 0)),
        "failed": int(job.get("failed", 0)),
        "progress": 1.0 if job["state"] == DONE else (scanned / goal if goal else None),
        "eta_s": eta,
        "cost": {
            "alerts_scanned": scanned,
            "batches": int(job.get("batches", 0)),
            "retries": int(job.get("retries", 0)),
            "db_ms": round(float(job.get("db_ms", 0.0)), 1),
            "elapsed_s": round(elapsed, 3),
            "alerts_per_s": None if rate is None else round(rate, 1),
        },
        "last": job.get("last"),
        **{k: job.get(k) for k in ("created_at", "started_at", "finished_at")},
    }


async def cancel(db: AsyncDatabase[Doc], cfg: Config, query: Doc) -> int:
    """Cancel the queued or running jobs matching `query`; how many. A runner sees it at its
    next checkpoint and stops there."""
    result = await db[jobs_collection(cfg)].update_many(
        {**query, "state": {"$in": list(ACTIVE)}},
        {"$set": {"state": CANCELLED, "finished_at": utcnow(), "updated_at": utcnow()}},
    )
    return int(result.modified_count)


async def claim(
    db: AsyncDatabase[Doc], cfg: Config, runner: str, job_id: str | None = None
) -> Doc | None:
    """The oldest queued job, or a running one whose lease expired (its runner died), leased to
    `runner`; None when there is none."""
    at = utcnow()
    query: Doc = {
        "state": {"$in": list(ACTIVE)},
        "$or": [{"lease_until": None}, {"lease_until": {"$lt": at}}],
    }
    if job_id is not None:
        query["_id"] = job_id
    job: Doc | None = await db[jobs_collection(cfg)].find_one_and_update(
        query,
        {
            "$set": {
                "state": RUNNING,
                "lease_owner": runner,
                "lease_until": at + dt.timedelta(seconds=cfg.backfill.lease_s),
                "updated_at": at,
            },
            "$min": {"started_at": at},
        },
        sort=[("created_at", 1)],
        return_document=ReturnDocument.AFTER,
    )
    return job


async def checkpoint(
    db: AsyncDatabase[Doc], cfg: Config, job_id: str, runner: str, last: Doc, counts: Doc
) -> bool:
    """Record a finished batch (the last alert done, counters added) and renew the lease;
    False when the job is no longer this runner's (cancelled, or taken over)."""
    at = utcnow()
    result = await db[jobs_collection(cfg)].update_one(
        {"_id": job_id, "state": RUNNING, "lease_owner": runner},
        {
            "$set": {
                "last": last,
                "updated_at": at,
                "lease_until": at + dt.timedelta(seconds=cfg.backfill.lease_s),
            },
            "$inc": counts,
        },
    )
    return result.modified_count == 1


async def finish(
    db: AsyncDatabase[Doc], cfg: Config, job_id: str, runner: str, state: str, error: str = ""
) -> bool:
    at = utcnow()
    result = await db[jobs_collection(cfg)].update_one(
        {"_id": job_id, "state": RUNNING, "lease_owner": runner},
        {
            "$set": {
                "state": state,
                "error": error or None,
                "finished_at": at,
                "updated_at": at,
                "lease_until": None,
            }
        },
    )
    return result.modified_count == 1
