"""User filter pipelines: upstream stages (from config) + permissions + the user's stages.

Used by the API (save-time test run, /test endpoint) and by the ingester (once per batch).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from bson import json_util
from pymongo.asynchronous.database import AsyncDatabase

from kowalski.config import FILTER_HISTORY, FILTER_MATCH, Config
from kowalski.documents import Doc
from kowalski.surveys import survey_for_collection

# stages a user filter may not contain (upstream: $lookup/$unionWith/$out/$merge), plus JavaScript
FORBIDDEN_FILTER_STAGES = frozenset({"$lookup", "$unionWith", "$out", "$merge"})
PROGRAMID_ITEM = "$$item.programid"
# stages after which a document holds only the fields the stage names (an inclusion `$project`
# too): a field a pipeline never names does not reach its output past one of them
RESHAPING_STAGES = frozenset(
    {"$group", "$count", "$replaceRoot", "$replaceWith", "$bucket", "$bucketAuto", "$sortByCount"}
)
WHOLE_DOCUMENT = ("$$ROOT", "$$CURRENT")


class FilterError(ValueError):
    """An invalid filter pipeline; the message says why."""


def parse_pipeline(value: Any, field: str = "pipeline") -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = json_util.loads(value)
        except ValueError as exc:
            raise FilterError(f"{field}: not valid JSON: {exc}") from None
    if not isinstance(value, list) or not value:
        raise FilterError(f"{field} must be a non-empty list of stages")
    if not all(isinstance(stage, dict) and len(stage) == 1 for stage in value):
        raise FilterError(f"{field}: each stage must be an object with exactly one operator")
    used = {next(iter(stage)) for stage in value} & FORBIDDEN_FILTER_STAGES
    if used:
        raise FilterError(f"pipeline uses forbidden stages: {sorted(used)}")
    return value


def serialize_pipeline(pipeline: list[dict[str, Any]]) -> str:
    return json_util.dumps(pipeline)


def _set_item_permissions(node: Any, permissions: list[int]) -> None:
    """Fill every `{"$in": ["$$item.programid", …]}` in the history stage with `permissions`."""
    if isinstance(node, dict):
        clause = node.get("$in")
        if isinstance(clause, list) and len(clause) == 2 and clause[0] == PROGRAMID_ITEM:
            clause[1] = list(permissions)
        for value in node.values():
            _set_item_permissions(value, permissions)
    elif isinstance(node, list):
        for value in node:
            _set_item_permissions(value, permissions)


def _add_history_cutoff(node: Any, operator: str = "$lt") -> None:
    """History only "as of" each alert: `item.jd < candidate.jd` for archive test runs, `$lte`
    (the alert's own detection included, as the live path sees it) for back-fills."""
    if isinstance(node, dict):
        cond = (
            node.get("$filter", {}).get("cond") if isinstance(node.get("$filter"), dict) else None
        )
        if isinstance(cond, dict):
            node["$filter"]["cond"] = {"$and": [cond, {operator: ["$$item.jd", "$candidate.jd"]}]}
        for value in node.values():
            _add_history_cutoff(value, operator)


def upstream_stages(cfg: Config, catalog: str, permissions: list[int]) -> list[dict[str, Any]]:
    try:
        stages = copy.deepcopy(cfg.database.filters[catalog])
    except KeyError:
        raise FilterError(
            f"catalog {catalog} has no filter stages configured "
            f"(one of {sorted(cfg.database.filters)})"
        ) from None
    match = stage(cfg, catalog, stages, FILTER_MATCH)["$match"]
    if "candidate.programid" in match:
        match["candidate.programid"] = {"$in": list(permissions)}
    _set_item_permissions(stage(cfg, catalog, stages, FILTER_HISTORY), permissions)
    return stages


def stage(cfg: Config, catalog: str, stages: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The upstream stage configured under `name` for `catalog`, in (a copy of) its pipeline."""
    return stages[cfg.database.filter_stage_index(catalog, name)]


# ------------------------------------------------------------- history the user's stages read


def _names(node: Any) -> Iterator[str]:
    """Every key and string in a pipeline (field paths, `$getField` names, variables)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _names(value)
    elif isinstance(node, str):
        yield node


def _field_root(name: str) -> str:
    return name.lstrip("$").split(".", 1)[0]


def _reshapes(stage_: dict[str, Any]) -> bool:
    """Whether a stage's output holds only the fields it names."""
    operator, spec = next(iter(stage_.items()))
    if operator in RESHAPING_STAGES:
        return True
    if operator != "$project" or not isinstance(spec, dict):
        return False
    return any(v not in (0, False) for k, v in spec.items() if k != "_id")


def fields_read(pipeline: list[dict[str, Any]], fields: frozenset[str]) -> frozenset[str]:
    """Which of `fields` a user pipeline may read or pass on to its output: those it names
    anywhere, or all of them where it uses the whole document or never reshapes it (each
    `$facet` branch counts as a pipeline of its own)."""
    names = list(_names(pipeline))
    if any(name.startswith(WHOLE_DOCUMENT) for name in names):
        return fields
    named = frozenset(_field_root(name) for name in names) & fields
    for stage_ in pipeline:
        operator, spec = next(iter(stage_.items()))
        if operator == "$facet" and isinstance(spec, dict):
            branches = [b for b in spec.values() if isinstance(b, list)]
            return named.union(*(fields_read(b, fields) for b in branches))
        if _reshapes(stage_):
            return named
    return fields


def _references(node: Any, field_name: str) -> bool:
    return any(_field_root(n) == field_name for n in _names(node) if n.startswith("$"))


def read_history_only(
    stages: list[dict[str, Any]], history_index: int, pipeline: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The upstream stages reading only the history the user's pipeline can read: the history
    stage's fields built from a `$lookup` (`prv_candidates`, `fp_hists`, `cross_matches`, ...)
    that the pipeline never names are left out, a `$lookup` nothing reads any more is not run, and
    one still read fetches only the fields read (a `$project` sub-pipeline). The pipeline's
    answers are the same; the database joins and sends less."""
    history = stages[history_index]["$project"]
    looked_up = [s["$lookup"]["as"] for s in stages[:history_index] if "$lookup" in s]
    joined = frozenset(
        key for key, value in history.items() if any(_references(value, a) for a in looked_up)
    )
    unread = joined - fields_read(pipeline, joined)
    history = {k: v for k, v in history.items() if k not in unread}
    stages[history_index] = {"$project": history}
    out = []
    for index, stage_ in enumerate(stages):
        if "$lookup" in stage_ and index < history_index:
            name = str(stage_["$lookup"]["as"])
            elsewhere = [*stages[index + 1 : history_index], *stages[history_index + 1 :]]
            if name in history or _references(elsewhere, name):
                out.append(stage_)  # read whole, or outside the history stage: left as it is
                continue
            reads = {k: v for k, v in history.items() if _references(v, name)}
            if not reads:
                continue
            stage_ = {"$lookup": _fetch_only(stage_["$lookup"], reads)}
        out.append(stage_)
    return out


def _fetch_only(lookup: dict[str, Any], reads: dict[str, Any]) -> dict[str, Any]:
    """A `localField`/`foreignField` `$lookup` fetching only the fields that `reads` (history
    field -> expression) take from it, where each reads the joined field of its own name."""
    if not reads or "pipeline" in lookup or "localField" not in lookup:
        return lookup
    if not all(any(n.endswith(f".{k}") for n in _names(v)) for k, v in reads.items()):
        return lookup
    return {**lookup, "pipeline": [{"$project": dict.fromkeys(sorted(reads), 1)}]}


def full_pipeline(
    cfg: Config,
    catalog: str,
    permissions: list[int],
    user_pipeline: list[dict[str, Any]],
    candids: list[int] | None = None,
    as_of: bool = False,
) -> list[dict[str, Any]]:
    """Upstream stages with permissions, `candid $in candids` in the match stage, without the
    history the user's stages cannot read, then the user's stages. `as_of`: the history only up
    to each alert's own detection, as the live path saw it then (back-fills over the archive)."""
    stages = upstream_stages(cfg, catalog, permissions)
    if candids is not None:
        stage(cfg, catalog, stages, FILTER_MATCH)["$match"]["candid"] = {"$in": list(candids)}
    if as_of:
        _add_history_cutoff(stage(cfg, catalog, stages, FILTER_HISTORY), "$lte")
    history = cfg.database.filter_stage_index(catalog, FILTER_HISTORY)
    return [*read_history_only(stages, history, user_pipeline), *copy.deepcopy(user_pipeline)]


def archive_pipeline(
    cfg: Config,
    catalog: str,
    permissions: list[int],
    user_pipeline: list[dict[str, Any]],
    object_ids: list[str] | None,
    jd_range: tuple[float, float] | None,
) -> list[dict[str, Any]]:
    """A filter run over archived alerts (the /test endpoint): no candid, history as of each alert."""
    stages = upstream_stages(cfg, catalog, permissions)
    match = stage(cfg, catalog, stages, FILTER_MATCH)["$match"]
    match.pop("candid", None)
    survey = survey_for_collection(cfg.database.collections, catalog)
    if object_ids:
        if survey is None:
            raise ValueError(f"{catalog} is not a survey's alert collection")
        match[survey.object_key] = {"$in": list(object_ids)}
    if jd_range:
        match["candidate.jd"] = {"$gte": jd_range[0], "$lt": jd_range[1]}
    _add_history_cutoff(stage(cfg, catalog, stages, FILTER_HISTORY))
    history = cfg.database.filter_stage_index(catalog, FILTER_HISTORY)
    return [*read_history_only(stages, history, user_pipeline), *copy.deepcopy(user_pipeline)]


# ------------------------------------------------------------- which alerts a pipeline passes


def passing_outputs(out: list[Doc]) -> dict[int, Doc] | None:
    """{candid: output} of the alerts with exactly one output (upstream: a pass is exactly one
    output document); None if an output lacks candid."""
    if not all("candid" in doc for doc in out):
        return None
    passed: dict[int, Doc] = {}
    counts: dict[int, int] = defaultdict(int)
    for doc in out:
        counts[int(doc["candid"])] += 1
        passed[int(doc["candid"])] = doc
    return {c: d for c, d in passed.items() if counts[c] == 1}


async def run_pipeline(
    db: AsyncDatabase[Doc],
    cfg: Config,
    catalog: str,
    permissions: list[int],
    pipeline: list[Doc],
    candids: Sequence[int],
    max_time_ms: int,
    as_of: bool = False,
) -> dict[int, Doc]:
    """{candid: output document} of one user pipeline over `candids` (`max_time_ms` per alert);
    a pipeline whose output drops candid is run per alert to attribute its outputs."""
    coll = db[catalog]
    full = full_pipeline(cfg, catalog, permissions, pipeline, list(candids), as_of)
    budget = max_time_ms * max(1, len(candids))
    out = await (await coll.aggregate(full, allowDiskUse=False, maxTimeMS=budget)).to_list()
    found = passing_outputs(out)
    if found is not None:
        return found
    passed: dict[int, Doc] = {}
    for candid in candids:
        one = full_pipeline(cfg, catalog, permissions, pipeline, [candid], as_of)
        docs = await (
            await coll.aggregate(one, allowDiskUse=False, maxTimeMS=max_time_ms)
        ).to_list()
        if len(docs) == 1:
            passed[candid] = docs[0]
    return passed
