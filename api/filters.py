"""Filters API (admin only; SkyPortal/Fritz pushes filters here): versions, autosave,
auto_followup, update_annotations, stream (results stream), save-time test run, and test runs
over archived alerts."""

from __future__ import annotations

import secrets
import string
from typing import Any

from aiohttp import web
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from api.auth import admin_required
from api.bodies import read_body
from api.models import FilterCreate, FilterPatch, FilterTest, parse
from api.responses import BadRequest, path_int, success
from api.safety import check_filter_pipeline
from api.state import CONFIG, DB, collection
from kowalski.config import Config
from kowalski.documents import utcnow
from kowalski.filtering import (
    FilterError,
    archive_pipeline,
    full_pipeline,
    parse_pipeline,
    serialize_pipeline,
)
from kowalski.results import validate_stream
from kowalski.stored_filters import new_filter, new_version

AUTOSAVE_KEYS = {"active", "comment", "ignore_group_ids", "pipeline", "saver_id"}
AUTO_FOLLOWUP_KEYS = {
    "active",
    "comment",
    "pipeline",
    "allocation_id",
    "payload",
    "target_group_ids",
    "ignore_allocation_ids",
    "not_if_tns_reported",
    "radius",
    "validity_days",
    "priority_order",
    "implements_update",
}
SAVE_TEST_MAX_TIME_MS = 3000
# Messages clients match on, worded as upstream Kowalski words them.
PRIORITY_ORDER_CLASH = (
    "Cannot add new filter with auto_followup: existing filters with the same allocation "
    "have priority_order set to a different value, which is unexpected"
)


def new_fid() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(6))


def stream_option(value: Any) -> bool | dict[str, bool]:
    """The `stream` option (publish passes to the results stream), validated for storage."""
    try:
        return validate_stream(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def user_pipeline(value: Any, field: str = "pipeline") -> list[dict[str, Any]]:
    try:
        pipeline = parse_pipeline(value, field)
    except FilterError as exc:
        raise BadRequest(str(exc)) from None
    check_filter_pipeline(pipeline, field)
    return pipeline


def _filters(request: web.Request) -> AsyncCollection[dict[str, Any]]:
    return collection(request, "filters")


async def test_run(
    request: web.Request,
    catalog: str,
    permissions: list[int],
    pipeline: list[dict[str, Any]],
    allow_empty: bool,
) -> str:
    """Run the full pipeline on the most recent alert of `catalog`: catches bad stages at save time."""
    cfg: Config = request.app[CONFIG]
    coll = request.app[DB][catalog]
    latest = await coll.find({}, {"candid": 1}).sort("_id", -1).limit(1).to_list()
    if not latest:
        if allow_empty:
            return f"WARNING: No documents in {catalog} to test the filter on"
        raise BadRequest(f"no documents in {catalog} to test the pipeline on")
    full = full_pipeline(cfg, catalog, permissions, pipeline, [latest[0]["candid"]])
    try:
        await (
            await coll.aggregate(full, allowDiskUse=False, maxTimeMS=SAVE_TEST_MAX_TIME_MS)
        ).to_list()
    except PyMongoError as exc:
        detail = getattr(exc, "details", None) or {}
        raise BadRequest(f"filter test run failed: {detail.get('errmsg', exc)}") from None
    return "filter test run successful"


def check_keys(option: dict[str, Any], allowed: set[str], name: str) -> None:
    unknown = set(option) - allowed
    if unknown:
        raise BadRequest(f"{name} has unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")


async def with_tested_pipeline(
    request: web.Request, doc: dict[str, Any], option: dict[str, Any], name: str
) -> dict[str, Any]:
    """The option with its pipeline validated, test-run on the latest alert, and serialized."""
    pipeline = user_pipeline(option["pipeline"], f"{name}.pipeline")
    await test_run(request, doc["catalog"], doc["permissions"], pipeline, allow_empty=False)
    return {**option, "pipeline": serialize_pipeline(pipeline)}


async def check_priority_order(request: web.Request, allocation_id: Any, order: str) -> None:
    """Every filter with this allocation, the one being changed included, must agree on the
    priority order (as upstream): the answer never depends on which filter holds the other one."""
    clash = await _filters(request).find_one(
        {
            "auto_followup.allocation_id": allocation_id,
            "auto_followup.priority_order": {"$nin": [order, None]},
        },
        {"filter_id": 1},
    )
    if clash:
        raise BadRequest(PRIORITY_ORDER_CLASH)


async def check_options(
    request: web.Request,
    doc: dict[str, Any],
    autosave: Any,
    auto_followup: Any,
) -> tuple[Any, Any]:
    """Validate autosave / auto_followup; serialize and test-run their pipelines."""
    if isinstance(autosave, dict):
        check_keys(autosave, AUTOSAVE_KEYS, "autosave")
        if "pipeline" in autosave:
            autosave = await with_tested_pipeline(request, doc, autosave, "autosave")
    elif not isinstance(autosave, bool):
        raise BadRequest("autosave must be a boolean or an object")
    if auto_followup:
        if not isinstance(auto_followup, dict):
            raise BadRequest("auto_followup must be an object")
        autosave_on = autosave if isinstance(autosave, bool) else autosave.get("active", False)
        if not autosave_on:
            raise BadRequest("Cannot setup auto_followup without autosave enabled")
        check_keys(auto_followup, AUTO_FOLLOWUP_KEYS, "auto_followup")
        if "pipeline" not in auto_followup:
            raise BadRequest("auto_followup.pipeline is required")
        order = auto_followup.get("priority_order")
        if order is not None:
            if not isinstance(order, str) or order not in ("asc", "desc"):
                raise BadRequest("auto_followup.priority_order must be 'asc' or 'desc'")
            await check_priority_order(request, auto_followup.get("allocation_id"), order)
        auto_followup = await with_tested_pipeline(request, doc, auto_followup, "auto_followup")
    return autosave, auto_followup or {}


@admin_required
async def filters_post(request: web.Request) -> web.Response:
    """POST /api/filters: create a filter, or add a new version to an existing one."""
    cfg: Config = request.app[CONFIG]
    body = await read_body(request)
    given = parse(FilterCreate, body, catalogs=cfg.database.filters)
    group_id, filter_id = given.group_id, given.filter_id
    catalog, permissions = given.catalog, given.permissions
    pipeline = user_pipeline(given.pipeline)

    existing = await _filters(request).find_one({"filter_id": filter_id})
    if existing and existing["group_id"] != group_id:
        raise BadRequest(f"filter id {filter_id} belongs to group {existing['group_id']}")
    base = existing or {"filter_id": filter_id, "catalog": catalog, "permissions": permissions}
    message = await test_run(
        request, base["catalog"], base["permissions"], pipeline, allow_empty=True
    )
    autosave, auto_followup = await check_options(
        request, base, body.get("autosave", False), body.get("auto_followup", {})
    )
    stream = stream_option(body.get("stream", False))
    version = new_version(new_fid(), pipeline, utcnow())
    if existing is None:
        document = new_filter(
            filter_id,
            group_id,
            catalog,
            permissions,
            version,
            autosave=autosave,
            auto_followup=auto_followup,
        )
        document["update_annotations"] = bool(body.get("update_annotations", False))
        document["stream"] = stream
        document["created_at"] = document["last_modified"] = version["created_at"]
        await _filters(request).insert_one(dict(document))
    else:
        update: dict[str, Any] = {"active_fid": version["fid"], "last_modified": utcnow()}
        for key, value in (("autosave", autosave), ("auto_followup", auto_followup)):
            if key in body:
                update[key] = value
        if "update_annotations" in body:
            update["update_annotations"] = bool(body["update_annotations"])
        if "stream" in body:
            update["stream"] = stream
        await _filters(request).update_one(
            {"filter_id": filter_id}, {"$push": {"fv": version}, "$set": update}
        )
    return success(f"{message}\nsaved new filter version: {version['fid']}", version)


async def _get(request: web.Request, filter_id: int) -> dict[str, Any]:
    doc: dict[str, Any] | None = await _filters(request).find_one(
        {"filter_id": filter_id}, {"_id": 0}
    )
    if doc is None:
        raise BadRequest(f"Filter id {filter_id} not found")  # 400, as upstream
    return doc


@admin_required
async def filters_get(request: web.Request) -> web.Response:
    """GET /api/filters/{filter_id}: a filter with all its versions."""
    filter_id = path_int(request, "filter_id")
    return success(f"Retrieved filter id {filter_id}", await _get(request, filter_id))


@admin_required
async def filters_patch(request: web.Request) -> web.Response:
    """PATCH /api/filters: change active, active_fid, autosave, auto_followup, update_annotations,
    stream."""
    body = await read_body(request)
    filter_id = parse(FilterPatch, body).filter_id
    doc = await _get(request, filter_id)
    update: dict[str, Any] = {"last_modified": utcnow()}
    if "active" in body:
        update["active"] = body["active"]
    if "active_fid" in body:
        if not isinstance(body["active_fid"], str) or body["active_fid"] not in {
            v["fid"] for v in doc["fv"]
        }:
            raise BadRequest(
                f"ValueError: Cannot set active_fid to {body['active_fid']}: "
                "filter version fid not in filter.fv"
            )
        update["active_fid"] = body["active_fid"]
    if "update_annotations" in body:
        update["update_annotations"] = bool(body["update_annotations"])
    if "stream" in body:
        update["stream"] = stream_option(body["stream"])
    if "autosave" in body or "auto_followup" in body:
        autosave, auto_followup = await check_options(
            request,
            doc,
            body.get("autosave", doc.get("autosave", False)),
            body.get("auto_followup", doc.get("auto_followup", {})),
        )
        update["autosave"], update["auto_followup"] = autosave, auto_followup
    await _filters(request).update_one({"filter_id": filter_id}, {"$set": update})
    return success(f"Updated filter id {filter_id}", await _get(request, filter_id))


@admin_required
async def filters_delete(request: web.Request) -> web.Response:
    """DELETE /api/filters/{filter_id}: remove a filter."""
    filter_id = path_int(request, "filter_id")
    result = await _filters(request).delete_one({"filter_id": filter_id})
    if result.deleted_count == 0:
        raise BadRequest(f"Filter id {filter_id} not found")
    return success(f"Removed filter id {filter_id}")


@admin_required
async def filters_test(request: web.Request) -> web.Response:
    """POST /api/filters/{filter_id}/test: run a filter version over archived alerts."""
    cfg: Config = request.app[CONFIG]
    filter_id = path_int(request, "filter_id")
    body = parse(FilterTest, await read_body(request))
    doc = await _get(request, filter_id)
    fid = body.filter_version
    versions = {v["fid"]: v for v in doc["fv"]}
    if fid is not None and (not isinstance(fid, str) or fid not in versions):
        raise BadRequest(f"filter version fid {fid} not in filter.fv")
    version = versions[fid] if fid else doc["fv"][-1]
    object_ids, jd_range, max_time_ms = body.object_ids, body.jd_range, body.max_time_ms
    pipeline = archive_pipeline(
        cfg,
        doc["catalog"],
        doc["permissions"],
        parse_pipeline(version["pipeline"]),
        object_ids,
        jd_range,
    )
    cursor = await request.app[DB][doc["catalog"]].aggregate(
        pipeline, allowDiskUse=False, maxTimeMS=max_time_ms
    )
    return success("filter test successful", await cursor.to_list())
