"""Classifications (human labels, ML scores) per alert: PUT/DELETE /api/classifications/{survey},
GET /api/classifications/{survey}/{candid}. Authenticated (upstream left these open);
writing needs an admin."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pymongo import UpdateOne

from api.auth import admin_required, current_user
from api.bodies import read_body
from api.models import ClassificationsDelete, ClassificationsPut, parse
from api.responses import BadRequest, NotFound, path_int, success
from api.state import CONFIG, DB
from kowalski.config import Config
from kowalski.surveys import UnknownSurvey, survey_for_key


def _collections(request: web.Request) -> tuple[Any, Any, str]:
    cfg: Config = request.app[CONFIG]
    key = request.match_info["survey"]
    try:
        survey = survey_for_key(key)
    except UnknownSurvey:
        raise BadRequest(f"classifications are not configured for survey {key.lower()!r}") from None
    names = cfg.database.collections
    alerts, labels = names.get(survey.alerts_key), names.get(f"{survey.alerts_key}_classifications")
    if not alerts or not labels:
        raise BadRequest(f"classifications are not configured for survey {survey.key!r}")
    db = request.app[DB]
    return db[alerts], db[labels], survey.object_key


@admin_required
async def classifications_put(request: web.Request) -> web.Response:
    """PUT /api/classifications/{survey}: `{candid: {human_labels, ml_scores}}`, merged into
    stored labels."""
    alerts, labels, object_key = _collections(request)
    body = parse(ClassificationsPut, await read_body(request)).root
    ids = list(body)
    found = {
        d["candid"]: d.get(object_key)
        for d in await alerts.find({"candid": {"$in": ids}}, {"candid": 1, object_key: 1}).to_list()
    }
    missing = sorted(set(ids) - set(found))
    if missing:
        raise NotFound(f"candids not found: {missing}")
    ops = []
    for candid, entry in body.items():
        update: dict[str, Any] = {object_key: found[candid]}
        for kind, labelled in entry.items():
            for label, score in labelled.items():
                update[f"{kind}.{label}"] = score
        ops.append(UpdateOne({"_id": candid}, {"$set": update}, upsert=True))
    if ops:
        await labels.bulk_write(ops, ordered=False)
    return success(f"updated classifications of {len(ops)} alerts")


@admin_required
async def classifications_delete(request: web.Request) -> web.Response:
    """DELETE /api/classifications/{survey}: `{candid: {human_labels: [labels], ml_scores:
    [labels]}}` removes those labels."""
    _, labels, _ = _collections(request)
    body = parse(ClassificationsDelete, await read_body(request)).root
    ops = []
    for candid, entry in body.items():
        unset = {f"{kind}.{label}": "" for kind, names in entry.items() for label in names}
        if unset:
            ops.append(UpdateOne({"_id": candid}, {"$unset": unset}))
    if ops:
        await labels.bulk_write(ops, ordered=False)
    return success(f"deleted classifications of {len(ops)} alerts")


async def classifications_get(request: web.Request) -> web.Response:
    """GET /api/classifications/{survey}/{candid}: an alert's labels and scores."""
    current_user(request)
    _, labels, object_key = _collections(request)
    candid = path_int(request, "candid")
    doc = await labels.find_one({"_id": candid})
    if doc is None:
        raise NotFound(f"no classifications for candid {candid}")
    return success(
        "retrieved classifications",
        {
            "candid": candid,
            object_key: doc.get(object_key),
            "human_labels": doc.get("human_labels", {}),
            "ml_scores": doc.get("ml_scores", {}),
        },
    )
