"""ZTF trigger proxies (admin only): ToO queues (`/api/triggers/ztf`) and MMA skymap triggers
(`/api/triggers/ztfmma`), each with a `.test` twin that validates and answers without proxying.

Requests go to the ZTF scheduler at `http://{ztf.mountain_ip}:{ztf.mountain_port}` (`/queues`,
`/mma_skymaps`). Upstream opened an SSH tunnel per request; here the tunnel (if any) is the
operator's, and `mountain_ip`/`mountain_port` point at its local end.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from api.auth import admin_required, read_body
from api.responses import ApiError, BadRequest, Conflict, success
from api.state import CONFIG
from kowalski.config import Config

TIMEOUT = aiohttp.ClientTimeout(total=10)
TOO_TARGET_KEYS = {
    "request_id",
    "program_id",
    "field_id",
    "ra",
    "dec",
    "filter_id",
    "exposure_time",
    "program_pi",
    "subprogram_name",
}


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{field} must be a number")
    return float(value)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key} must be a non-empty string")
    return value


def validate_too(body: dict[str, Any]) -> dict[str, Any]:
    _text(body, "queue_name")
    _text(body, "user")
    window = body.get("validity_window_mjd")
    if not isinstance(window, list) or len(window) != 2:
        raise BadRequest("validity_window_mjd must be [start, end] (MJD)")
    start, end = (_number(v, "validity_window_mjd") for v in window)
    if end <= start:
        raise BadRequest("validity_window_mjd: end must be after start")
    targets = body.get("targets")
    if not isinstance(targets, list) or not targets:
        raise BadRequest("targets must be a non-empty list")
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise BadRequest(f"targets[{i}] must be an object")
        missing = TOO_TARGET_KEYS - set(target)
        if missing:
            raise BadRequest(f"targets[{i}] is missing {sorted(missing)}")
    return body


def validate_mma(body: dict[str, Any]) -> dict[str, Any]:
    _text(body, "trigger_name")
    _text(body, "user")
    _number(body.get("trigger_time"), "trigger_time")
    fields = body.get("fields")
    if not isinstance(fields, list) or not fields:
        raise BadRequest("fields must be a non-empty list of {field_id, probability}")
    for i, item in enumerate(fields):
        if not isinstance(item, dict) or "field_id" not in item:
            raise BadRequest(f"fields[{i}] must be an object with field_id and probability")
        probability = _number(item.get("probability"), f"fields[{i}].probability")
        if not 0 <= probability <= 1:
            raise BadRequest(f"fields[{i}].probability must be in [0, 1]")
    return body


KINDS = {  # route kind -> (upstream path, name key, validator)
    "ztf": ("queues", "queue_name", validate_too),
    "ztfmma": ("mma_skymaps", "trigger_name", validate_mma),
}


def _kind(request: web.Request) -> tuple[str, bool]:
    name = request.match_info["kind"]
    test = name.endswith(".test")
    kind = name.removesuffix(".test")
    if kind not in KINDS:
        raise web.HTTPNotFound()
    return kind, test


async def _upstream(request: web.Request, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    cfg: Config = request.app[CONFIG]
    if not cfg.ztf.mountain_ip or not cfg.ztf.mountain_port:
        raise ApiError(
            "ZTF trigger service not configured (ztf.mountain_ip, ztf.mountain_port)", 503
        )
    url = f"http://{cfg.ztf.mountain_ip}:{cfg.ztf.mountain_port}/{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            session.request(method, url, **kwargs) as response,
        ):
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = await response.text()
            return response.status, data
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ApiError(f"ZTF trigger service unreachable: {type(exc).__name__}", 502) from None


@admin_required
async def trigger_put(request: web.Request) -> web.Response:
    """PUT /api/triggers/{ztf|ztfmma}[.test]: submit a queue / MMA trigger."""
    kind, test = _kind(request)
    path, key, validate = KINDS[kind]
    body = validate(await read_body(request))
    if test:
        return success("submitted", {})
    status, data = await _upstream(request, "PUT", path, json=body)
    if status == 201:
        return success("submitted", data)
    if status == 200:
        raise Conflict(f"Submitted {key.split('_')[0]} {body[key]} already exists")
    raise ApiError(f"ZTF trigger service answered {status}: {data}", 502)


@admin_required
async def trigger_get(request: web.Request) -> web.Response:
    """GET /api/triggers/{ztf|ztfmma}[.test]: query params or body with the name and user."""
    kind, test = _kind(request)
    path, key, _ = KINDS[kind]
    params = dict(request.query) or await read_body(request)
    # upstream's clients send trigger_name for queues too
    name = params.get(key) or params.get("trigger_name") or params.get("queue_name")
    user = params.get("user")
    if not isinstance(user, str) or not user:
        raise BadRequest("user is required")
    if test:
        return success("retrieved", {})
    query = {key: name, "user": user} if name else {"user": user}
    status, data = await _upstream(request, "GET", path, params=query)
    if status != 200:
        raise ApiError(f"ZTF trigger service answered {status}: {data}", 502)
    return success("retrieved", data)


@admin_required
async def trigger_delete(request: web.Request) -> web.Response:
    """DELETE /api/triggers/{ztf|ztfmma}[.test]: body {queue_name|trigger_name, user}."""
    kind, test = _kind(request)
    path, key, _ = KINDS[kind]
    body = await read_body(request)
    _text(body, key)
    _text(body, "user")
    if test:
        return success("deleted", {})
    status, data = await _upstream(
        request, "DELETE", path, json={key: body[key], "user": body["user"]}
    )
    if status not in (200, 204):
        raise ApiError(f"ZTF trigger service answered {status}: {data}", 502)
    return success("deleted", data if isinstance(data, dict) else {})
