"""Stage: run the active user filters on a batch: each filter once per batch (`candid $in batch`)
instead of once per alert. An alert passes a filter when the pipeline outputs a document with its
candid; a pipeline whose output drops `candid` is run per alert instead (upstream semantics: pass
= exactly one output document). Every run is recorded in `filter_runs` ("did my filter run?").
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from kowalski.config import Config
from kowalski.filtering import full_pipeline, parse_pipeline

log = logging.getLogger("kowalski.ingester.filters")
Doc = dict[str, Any]


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


async def active_filters(db: AsyncDatabase[Doc], cfg: Config, catalog: str) -> list[FilterTemplate]:
    """Active filters on `catalog` with their active version's pipeline."""
    templates = []
    docs = (
        await db[cfg.database.collections["filters"]]
        .find({"catalog": catalog, "active": True})
        .to_list()
    )
    for doc in docs:
        version = next((v for v in doc.get("fv", []) if v["fid"] == doc.get("active_fid")), None)
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
    coll = db[template.catalog]
    max_ms = cfg.ingester.filter_max_time_ms
    full = full_pipeline(cfg, template.catalog, template.permissions, pipeline, list(candids))
    out = await (
        await coll.aggregate(full, allowDiskUse=False, maxTimeMS=max_ms * max(1, len(candids)))
    ).to_list()
    if all("candid" in doc for doc in out):
        passed: dict[int, Doc] = {}
        counts: dict[int, int] = defaultdict(int)
        for doc in out:
            counts[int(doc["candid"])] += 1
            passed[int(doc["candid"])] = doc
        return {c: d for c, d in passed.items() if counts[c] == 1}
    # the user pipeline projected candid away: attribute outputs by running per alert
    passed = {}
    for candid in candids:
        one = full_pipeline(cfg, template.catalog, template.permissions, pipeline, [candid])
        docs = await (await coll.aggregate(one, allowDiskUse=False, maxTimeMS=max_ms)).to_list()
        if len(docs) == 1:
            passed[candid] = docs[0]
    return passed


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


async def run_filters(
    db: AsyncDatabase[Doc], cfg: Config, templates: Sequence[FilterTemplate], candids: Sequence[int]
) -> dict[int, list[Doc]]:
    """{candid: [passed filter records]} for the batch; every run is logged to `filter_runs`."""
    passed_by_candid: dict[int, list[Doc]] = defaultdict(list)
    runs = []
    for template in templates:
        record: Doc = {
            "filter_id": template.filter_id,
            "group_id": template.group_id,
            "fid": template.fid,
            "catalog": template.catalog,
            "candids": list(candids),
            "ran_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
        }
        try:
            passed = await _run(db, cfg, template, template.pipeline, candids)
            autosave = await _option(db, cfg, template, template.autosave, list(passed))
            followup = (
                await _option(db, cfg, template, template.auto_followup, list(autosave))
                if template.auto_followup
                else {}
            )
        except PyMongoError as exc:
            log.error("filter %s (%s) failed on a batch: %s", template.filter_id, template.fid, exc)
            runs.append({**record, "passed": [], "error": str(exc)})
            continue
        runs.append({**record, "passed": sorted(passed)})
        for candid, output in passed.items():
            entry: Doc = {
                "group_id": template.group_id,
                "filter_id": template.filter_id,
                "fid": template.fid,
                "permissions": template.permissions,
                "update_annotations": template.update_annotations,
                "data": output,
                "autosave": _autosave_entry(template.autosave, candid in autosave),
            }
            if candid in followup:
                entry["auto_followup"] = {**template.auto_followup, "data": followup[candid]}
            passed_by_candid[candid].append(entry)
    if runs:
        await db[cfg.database.collections["filter_runs"]].insert_many(runs)
    return dict(passed_by_candid)


def _autosave_entry(option: Any, applies: bool) -> Any:
    if not applies:
        return False
    if isinstance(option, dict):
        return {k: option[k] for k in ("comment", "ignore_group_ids", "saver_id") if k in option}
    return True
