"""User filter pipelines: upstream stages (from config) + permissions + the user's stages.

Used by the API (save-time test run, /test endpoint) and by the ingester (once per batch).
"""

from __future__ import annotations

import copy
from typing import Any

from bson import json_util

from kowalski.config import FILTER_HISTORY, FILTER_MATCH, Config
from kowalski.surveys import survey_for_collection

# stages a user filter may not contain (upstream: $lookup/$unionWith/$out/$merge), plus JavaScript
FORBIDDEN_FILTER_STAGES = frozenset({"$lookup", "$unionWith", "$out", "$merge"})
PROGRAMID_ITEM = "$$item.programid"


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


def _add_history_cutoff(node: Any) -> None:
    """For archive test runs: history only "as of" each alert (item.jd < candidate.jd)."""
    if isinstance(node, dict):
        cond = (
            node.get("$filter", {}).get("cond") if isinstance(node.get("$filter"), dict) else None
        )
        if isinstance(cond, dict):
            node["$filter"]["cond"] = {"$and": [cond, {"$lt": ["$$item.jd", "$candidate.jd"]}]}
        for value in node.values():
            _add_history_cutoff(value)


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


def full_pipeline(
    cfg: Config,
    catalog: str,
    permissions: list[int],
    user_pipeline: list[dict[str, Any]],
    candids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Upstream stages with permissions, `candid $in candids` in the match stage, then the user's."""
    stages = upstream_stages(cfg, catalog, permissions)
    if candids is not None:
        stage(cfg, catalog, stages, FILTER_MATCH)["$match"]["candid"] = {"$in": list(candids)}
    return [*stages, *copy.deepcopy(user_pipeline)]


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
    return [*stages, *copy.deepcopy(user_pipeline)]
