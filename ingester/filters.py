"""Stage: run the active user filters on a batch: each filter once per batch (`candid $in batch`)
instead of once per alert. An alert passes a filter when the pipeline outputs a document with its
candid; a pipeline whose output drops `candid` is run per alert instead (upstream semantics: pass
= exactly one output document). Every run is recorded in `filter_runs` ("did my filter run?").

A run that fails (the database refuses the aggregation or it exceeds `filter_max_time_ms`, e.g.
on a loaded machine) is never recorded as "passed nothing": after a back-off the batch is split in
halves, down to single alerts, and a single alert is retried `SINGLE_ATTEMPTS` times. Only a
filter that still fails on one alert is recorded as failed (`state: "failed"` with the error, one
`filter_runs` record per alert, counted in the batch report, listed by
`python -m ingester failed-filters`). Errors that mean the database itself is unavailable are
not filter failures: they propagate and the consumer retries the whole batch.

Re-running a batch (after a crash) never doubles a record: alerts already recorded for a filter
version are left out of the new records.

Filters with the same permissions run together: the upstream stages (candid match, history
`$lookup` and `$project`) once, then every filter as one branch of a `$facet`, in one aggregation:
one round trip for all filters instead of one each, and the history joined once (measured ~7x
less database time for 25 filters; see README, Benchmark). A filter whose output lacks `candid`,
whose stages `$facet` cannot hold, or any failure of the shared run falls back to running that
filter alone as described above, so the result never depends on this shortcut.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from ingester.archive import database_unavailable
from kowalski.config import Config
from kowalski.documents import Doc, utcnow
from kowalski.filtering import full_pipeline, parse_pipeline, passing_outputs, run_pipeline
from kowalski.retry import backoff
from kowalski.stored_filters import find_version

log = logging.getLogger("kowalski.ingester.filters")
SINGLE_ATTEMPTS = 3  # tries of a filter on one alert before it is recorded failed
BACKOFF_SECONDS = 0.25  # first back-off; doubles with every retry of the same alerts
OK, FAILED = "ok", "failed"
# stages a `$facet` branch may not contain: such a filter runs alone
NOT_IN_FACET = frozenset(
    {"$facet", "$out", "$merge", "$geoNear", "$collStats", "$indexStats", "$planCacheStats"}
)


@dataclass
class FilterTemplate:
    filter_id: int
    group_id: int
    fid: str
    catalog: str
    permissions: list[int]
    pipeline: list[Doc]
    autosave: Any = False
    auto_followup: Doc = field(default_factory=dict)
    update_annotations: bool = False
    as_of: bool = False  # history only up to each alert (back-fills over the archive)


async def active_filters(db: AsyncDatabase[Doc], cfg: Config, catalog: str) -> list[FilterTemplate]:
    """Active filters on `catalog` with their active version's pipeline."""
    templates = []
    docs = (
        await db[cfg.database.collection("filters")]
        .find({"catalog": catalog, "active": True})
        .to_list()
    )
    for doc in docs:
        version = find_version(doc)
        if version is None:
            log.warning("filter %s has no active version; skipped", doc.get("filter_id"))
            continue
        try:
            pipeline = parse_pipeline(version["pipeline"])
        except ValueError as exc:
            log.warning("filter %s: bad pipeline: %s", doc.get("filter_id"), exc)
            continue
        templates.append(
            FilterTemplate(
                filter_id=doc["filter_id"],
                group_id=doc["group_id"],
                fid=version["fid"],
                catalog=catalog,
                permissions=list(doc.get("permissions", [])),
                pipeline=pipeline,
                autosave=doc.get("autosave", False),
                auto_followup=doc.get("auto_followup") or {},
                update_annotations=bool(doc.get("update_annotations", False)),
            )
        )
    return templates


async def _run(
    db: AsyncDatabase[Doc],
    cfg: Config,
    template: FilterTemplate,
    pipeline: list[Doc],
    candids: Sequence[int],
) -> dict[int, Doc]:
    """{candid: output document} of one pipeline over `candids`."""
    return await run_pipeline(
        db,
        cfg,
        template.catalog,
        template.permissions,
        pipeline,
        candids,
        cfg.ingester.filter_max_time_ms,
        template.as_of,
    )


def _facet_groups(templates: Sequence[FilterTemplate]) -> list[list[int]]:
    """Indices of the templates that can share one run, grouped by catalog and permissions."""
    groups: dict[tuple[str, tuple[int, ...], bool], list[int]] = defaultdict(list)
    for i, template in enumerate(templates):
        stages = {next(iter(stage)) for stage in template.pipeline if stage}
        if not stages & NOT_IN_FACET:
            key = (template.catalog, tuple(sorted(template.permissions)), template.as_of)
            groups[key].append(i)
    return [group for group in groups.values() if len(group) > 1]


async def run_together(
    db: AsyncDatabase[Doc],
    cfg: Config,
    templates: Sequence[FilterTemplate],
    candids: Sequence[int],
) -> dict[int, dict[int, Doc]]:
    """{template index: {candid: output}} for the templates answered by shared `$facet` runs;
    templates left out (or a whole group whose run failed) are run alone by the caller."""
    answered: dict[int, dict[int, Doc]] = {}
    max_ms = cfg.ingester.filter_max_time_ms
    for group in _facet_groups(templates):
        first = templates[group[0]]
        facet = [{"$facet": {f"f{i}": copy.deepcopy(templates[i].pipeline) for i in group}}]
        pipeline = full_pipeline(
            cfg, first.catalog, first.permissions, facet, list(candids), first.as_of
        )
        budget = max_ms * max(1, len(candids)) * len(group)
        try:
            cursor = await db[first.catalog].aggregate(
                pipeline, allowDiskUse=False, maxTimeMS=budget
            )
            out = (await cursor.to_list())[0]
        except OperationFailure as exc:
            if database_unavailable(exc):
                raise
            log.info("shared run of %d filters failed, running them alone: %s", len(group), exc)
            continue
        for i in group:
            passed = passing_outputs(out.get(f"f{i}", []))
            if passed is not None:
                answered[i] = passed
    return answered


async def _option(
    db: AsyncDatabase[Doc], cfg: Config, template: FilterTemplate, option: Any, candids: list[int]
) -> dict[int, Doc | None]:
    """autosave / auto_followup: which passing candids it applies to (with the pipeline output)."""
    if isinstance(option, bool):
        return dict.fromkeys(candids) if option else {}
    if not isinstance(option, dict) or not option.get("active", False):
        return {}
    if "pipeline" not in option:
        return dict.fromkeys(candids)
    return dict(await _run(db, cfg, template, parse_pipeline(option["pipeline"]), candids))


@dataclass
class FilterOutcome:
    """One filter over some alerts: outputs of the passing ones, which of those autosave and
    auto_followup apply to, the alerts it failed on (with the error) and how many retries it took."""

    passed: dict[int, Doc] = field(default_factory=dict)
    autosave: dict[int, Doc | None] = field(default_factory=dict)
    followup: dict[int, Doc | None] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    retries: int = 0

    def merge(self, other: FilterOutcome) -> FilterOutcome:
        return FilterOutcome(
            {**self.passed, **other.passed},
            {**self.autosave, **other.autosave},
            {**self.followup, **other.followup},
            {**self.failed, **other.failed},
            self.retries + other.retries,
        )


@dataclass
class FilterResults:
    """The filter stage's answer for a batch."""

    passed: dict[int, list[Doc]] = field(default_factory=dict)  # candid -> passed filter entries
    retries: int = 0  # failed attempts that were retried (smaller or later)
    failures_by_filter: dict[int, int] = field(default_factory=dict)  # filter_id -> failures

    @property
    def failures(self) -> int:
        """(filter, alert) pairs recorded failed."""
        return sum(self.failures_by_filter.values())

    def passes_by_filter(self) -> dict[int, int]:
        """filter_id -> the batch's alerts that passed it."""
        return dict(
            Counter(int(e["filter_id"]) for entries in self.passed.values() for e in entries)
        )


async def _attempt(
    db: AsyncDatabase[Doc],
    cfg: Config,
    template: FilterTemplate,
    candids: list[int],
    known: dict[int, Doc] | None = None,
) -> FilterOutcome:
    """The filter (unless its outputs are `known` from a shared run), then its options."""
    passed = (
        known if known is not None else await _run(db, cfg, template, template.pipeline, candids)
    )
    autosave = await _option(db, cfg, template, template.autosave, list(passed))
    followup = (
        await _option(db, cfg, template, template.auto_followup, list(autosave))
        if template.auto_followup
        else {}
    )
    return FilterOutcome(passed, autosave, followup)


async def run_resilient(
    db: AsyncDatabase[Doc],
    cfg: Config,
    template: FilterTemplate,
    candids: list[int],
    known: dict[int, Doc] | None = None,
) -> FilterOutcome:
    """One filter over `candids` (its outputs may be `known` from a shared run); on failure back
    off and split in halves down to single alerts, each tried `SINGLE_ATTEMPTS` times.
    Database-unavailable errors propagate."""
    attempts = SINGLE_ATTEMPTS if len(candids) == 1 else 1
    error = ""
    for attempt in range(attempts):
        try:
            return await _attempt(db, cfg, template, candids, known if attempt == 0 else None)
        except OperationFailure as exc:
            if database_unavailable(exc):
                raise
            error = f"{type(exc).__name__}: {(exc.details or {}).get('errmsg', exc)}"
            log.warning(
                "filter %s (%s) failed on %d alert(s), attempt %d: %s",
                template.filter_id,
                template.fid,
                len(candids),
                attempt + 1,
                error,
            )
            await asyncio.sleep(backoff(attempt + 1, BACKOFF_SECONDS))
    if len(candids) == 1:
        log.error("filter %s (%s) failed on alert %s", template.filter_id, template.fid, candids[0])
        return FilterOutcome(failed={candids[0]: error}, retries=attempts - 1)
    half = len(candids) // 2
    left = await run_resilient(db, cfg, template, candids[:half])
    right = await run_resilient(db, cfg, template, candids[half:])
    return left.merge(right).merge(FilterOutcome(retries=1))


async def _recorded(
    db: AsyncDatabase[Doc], cfg: Config, templates: Sequence[FilterTemplate], candids: list[int]
) -> set[tuple[int, str, int]]:
    """(filter_id, fid, candid) already in `filter_runs` for this batch (a batch run again)."""
    docs = (
        await db[cfg.database.collection("filter_runs")]
        .find(
            {
                "filter_id": {"$in": [t.filter_id for t in templates]},
                "candids": {"$in": candids},
            },
            {"_id": 0, "filter_id": 1, "fid": 1, "candids": 1},
        )
        .to_list()
    )
    batch = set(candids)
    return {(d["filter_id"], d["fid"], c) for d in docs for c in d["candids"] if c in batch}


def _run_records(
    template: FilterTemplate, outcome: FilterOutcome, candids: list[int], skip: set[int]
) -> list[Doc]:
    """The `filter_runs` records of one filter over a batch: one for the alerts it ran on, one
    per alert it failed on; alerts in `skip` (recorded by an earlier run) are left out."""
    base: Doc = {
        "filter_id": template.filter_id,
        "group_id": template.group_id,
        "fid": template.fid,
        "catalog": template.catalog,
        "ran_at": utcnow(),
    }
    ran = [c for c in candids if c not in outcome.failed and c not in skip]
    records = []
    if ran:
        passed = sorted(c for c in outcome.passed if c not in skip)
        records.append({**base, "candids": ran, "passed": passed, "state": OK})
    for candid, error in outcome.failed.items():
        if candid not in skip:
            records.append(
                {**base, "candids": [candid], "passed": [], "state": FAILED, "error": error}
            )
    return records


def pass_entry(template: FilterTemplate, outcome: FilterOutcome, candid: int) -> Doc:
    """What a pass hands on (the hand-off, the results stream): the filter and its output."""
    entry: Doc = {
        "group_id": template.group_id,
        "filter_id": template.filter_id,
        "fid": template.fid,
        "permissions": template.permissions,
        "update_annotations": template.update_annotations,
        "data": outcome.passed[candid],
        "autosave": _autosave_entry(template.autosave, candid in outcome.autosave),
    }
    if candid in outcome.followup:
        entry["auto_followup"] = {**template.auto_followup, "data": outcome.followup[candid]}
    return entry


async def run_filters(
    db: AsyncDatabase[Doc],
    cfg: Config,
    templates: Sequence[FilterTemplate],
    candids: Sequence[int],
    shared: bool = True,
) -> FilterResults:
    """Every template over the batch; every run is recorded in `filter_runs` exactly once.
    `shared=False` runs each filter alone (upstream's way; the benchmark's baseline)."""
    batch = list(candids)
    results = FilterResults()
    passed_by_candid: dict[int, list[Doc]] = defaultdict(list)
    recorded = await _recorded(db, cfg, templates, batch) if templates else set()
    together = await run_together(db, cfg, templates, batch) if shared else {}
    runs: list[Doc] = []
    for i, template in enumerate(templates):
        outcome = await run_resilient(db, cfg, template, batch, together.get(i))
        skip = {c for f, v, c in recorded if (f, v) == (template.filter_id, template.fid)}
        runs.extend(_run_records(template, outcome, batch, skip))
        results.retries += outcome.retries
        if outcome.failed:
            failures = results.failures_by_filter
            failures[template.filter_id] = failures.get(template.filter_id, 0) + len(outcome.failed)
        for candid in outcome.passed:
            passed_by_candid[candid].append(pass_entry(template, outcome, candid))
    if runs:
        await db[cfg.database.collection("filter_runs")].insert_many(runs)
    results.passed = dict(passed_by_candid)
    return results


async def failed_runs(db: AsyncDatabase[Doc], cfg: Config, limit: int = 100) -> list[Doc]:
    """The latest filter runs recorded failed (newest first): what an admin should look at."""
    return (
        await db[cfg.database.collection("filter_runs")]
        .find({"state": FAILED}, {"_id": 0})
        .sort("ran_at", -1)
        .limit(limit)
        .to_list()
    )


def _autosave_entry(option: Any, applies: bool) -> Any:
    if not applies:
        return False
    if isinstance(option, dict):
        return {k: option[k] for k in ("comment", "ignore_group_ids", "saver_id") if k in option}
    return True
