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

from api.auth import admin_required
from api.bodies import read_body
from api.models import MmaTrigger, Model, TooTrigger, TriggerDelete, parse, text
from api.responses import ApiError, BadRequest, Conflict, success
from api.state import CONFIG
from kowalski.config import Config

TIMEOUT = aiohttp.ClientTimeout(total=10)
KINDS: dict[str, tuple[str, str, type[Model]]] = {  # route kind -> (upstream path, name, body)
    "ztf": ("queues", "queue_name", TooTrigger),
    "ztfmma": ("mma_skymaps", "trigger_name", MmaTrigger),
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
    path, key, model = KINDS[kind]
    body = await read_body(request)
    parse(model, body)  # validated; forwarded as sent
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
    given = parse(TriggerDelete, await read_body(request))
    body = {key: text(getattr(given, key), key), "user": text(given.user, "user")}
    if test:
        return success("deleted", {})
    status, data = await _upstream(request, "DELETE", path, json=body)
    if status not in (200, 204):
        raise ApiError(f"ZTF trigger service answered {status}: {data}", 502)
    return success("deleted", data if isinstance(data, dict) else {})
