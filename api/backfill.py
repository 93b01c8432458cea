"""Filter back-fills and explain (any logged-in user; data rights narrow what they run over).

- `POST /api/filters/{filter_id}/backfill`: queue a job (`kowalski/backfill.py`) that runs a
  filter version over the archived alerts of a time range; a runner (`ingester/backfill.py`)
  picks it up.
- `GET /api/filters/{filter_id}/backfill[?job_id=]`: the jobs' state, progress, ETA and cost.
- `DELETE /api/filters/{filter_id}/backfill[?job_id=]`: cancel.
- `POST /api/filters/{filter_id}/explain`: the filter (or a draft pipeline) stage by stage on a
  sample (`kowalski/explain.py`).

Every run uses the filter's programids narrowed to those the user may see; a user sees and
cancels only their own jobs (admins: all).
"""

from __future__ import annotations

from aiohttp import web
from pymongo.errors import PyMongoError

from api.bodies import read_body
from api.filters import user_pipeline
from api.models import BackfillCreate, FilterExplain, parse
from api.policy import DataRights, data_rights
from api.responses import BadRequest, TooManyRequests, path_int, success
from api.state import CONFIG, DB
from kowalski import backfill, explain
from kowalski.config import Config
from kowalski.documents import Doc
from kowalski.filtering import FilterError

MAX_LISTED = 100


async def filter_doc(request: web.Request, filter_id: int) -> Doc:
    cfg: Config = request.app[CONFIG]
    doc: Doc | None = await request.app[DB][cfg.database.collections["filters"]].find_one(
        {"filter_id": filter_id}, {"_id": 0}
    )
    if doc is None:
        raise BadRequest(f"Filter id {filter_id} not found")  # 400, as the filters API
    return doc


def allowed_programids(rights: DataRights, catalog: str) -> list[int] | None:
    """The programids of `catalog`'s survey the user may see; None: all of them."""
    survey = rights.restricting_survey(catalog)
    return None if survey is None else rights.programids(survey.name)


def job_scope(request: web.Request, filter_id: int) -> Doc:
    """The jobs of this filter the user may see and cancel (with `?job_id=`: that one)."""
    rights = data_rights(request)
    scope: Doc = {"filter_id": filter_id}
    if not rights.admin:
        scope["owner"] = rights.user.username
    if "job_id" in request.query:
        scope["_id"] = request.query["job_id"]
    return scope


async def backfill_post(request: web.Request) -> web.Response:
    """POST /api/filters/{filter_id}/backfill: run a filter version over the archive as a job."""
    cfg: Config = request.app[CONFIG]
    filter_id = path_int(request, "filter_id")
    body = parse(BackfillCreate, await read_body(request))
    rights = data_rights(request)
    doc = await filter_doc(request, filter_id)
    try:
        job = await backfill.create_job(
            request.app[DB],
            cfg,
            doc,
            owner=rights.user.username,
            admin=rights.admin,
            allowed=allowed_programids(rights, doc["catalog"]),
            jd_range=(body.start, body.end),
            fid=body.fid,
            outputs=body.outputs,
            max_alerts=body.max_alerts,
        )
    except backfill.TooManyJobs as exc:
        raise TooManyRequests(str(exc)) from None
    except backfill.BackfillError as exc:
        raise BadRequest(str(exc)) from None
    return success(f"queued back-fill {job['_id']} of filter id {filter_id}", backfill.status(job))


async def backfill_get(request: web.Request) -> web.Response:
    """GET /api/filters/{filter_id}/backfill: back-fill jobs with progress, ETA and cost."""
    cfg: Config = request.app[CONFIG]
    filter_id = path_int(request, "filter_id")
    jobs = request.app[DB][backfill.jobs_collection(cfg)]
    found = await (
        jobs.find(job_scope(request, filter_id)).sort("created_at", -1).limit(MAX_LISTED).to_list()
    )
    if "job_id" in request.query:
        if not found:
            raise BadRequest(f"no back-fill {request.query['job_id']} of filter id {filter_id}")
        return success(f"back-fill {found[0]['_id']}", backfill.status(found[0]))
    return success(
        f"{len(found)} back-fill(s) of filter id {filter_id}", [backfill.status(j) for j in found]
    )


async def backfill_delete(request: web.Request) -> web.Response:
    """DELETE /api/filters/{filter_id}/backfill: cancel the queued and running back-fills."""
    filter_id = path_int(request, "filter_id")
    cancelled = await backfill.cancel(
        request.app[DB], request.app[CONFIG], job_scope(request, filter_id)
    )
    return success(f"cancelled {cancelled} back-fill(s) of filter id {filter_id}")


async def explain_post(request: web.Request) -> web.Response:
    """POST /api/filters/{filter_id}/explain: a filter version or draft pipeline stage by stage
    on a sample of the archive, with its passes per night and against the active version."""
    cfg: Config = request.app[CONFIG]
    filter_id = path_int(request, "filter_id")
    body = parse(FilterExplain, await read_body(request))
    jd_range = body.jd_range
    if body.max_alerts > cfg.backfill.explain_max_alerts:
        raise BadRequest(
            f"max_alerts may be at most {cfg.backfill.explain_max_alerts} "
            "(backfill.explain_max_alerts)"
        )
    rights = data_rights(request)
    doc = await filter_doc(request, filter_id)
    catalog = str(doc["catalog"])
    permissions = backfill.effective_permissions(
        cfg, catalog, doc["permissions"], allowed_programids(rights, catalog)
    )
    try:
        if body.pipeline is not None:
            fid, pipeline = "draft", user_pipeline(body.pipeline)
        else:
            fid, pipeline = backfill.filter_version(doc, body.fid)
        active = doc.get("active_fid")
        compare = backfill.filter_version(doc, None) if active and fid != active else None
    except (backfill.BackfillError, FilterError) as exc:
        raise BadRequest(str(exc)) from None
    try:
        result = await explain.explain(
            request.app[DB],
            cfg,
            catalog,
            permissions,
            pipeline,
            jd_range=jd_range,
            limit=body.max_alerts,
            max_time_ms=body.max_time_ms,
            compare=compare,
        )
    except PyMongoError as exc:
        detail = getattr(exc, "details", None) or {}
        raise BadRequest(f"explain failed: {detail.get('errmsg', exc)}") from None
    return success(
        f"explained filter id {filter_id} ({fid})", {"filter_id": filter_id, "fid": fid, **result}
    )
