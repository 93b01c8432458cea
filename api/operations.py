"""Operations routes: `GET /metrics` (Prometheus exposition of this worker, admins only: never
anonymous on a public port), `GET /healthz` (alive, anonymous) and `GET /readyz` (the database
answers within 2 s, anonymous)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from api.auth import admin_required
from api.state import DB
from kowalski import metrics

READY_TIMEOUT_S = 2.0


@admin_required
async def metrics_get(request: web.Request) -> web.Response:
    """GET /metrics: this API worker's metrics (Prometheus text format)."""
    body, kind = metrics.exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = kind
    return response


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process serves requests."""
    return web.json_response({"status": "success", "message": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when the database answers a ping within 2 s, else 503 saying why."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await request.app[DB].command("ping")
    except Exception as exc:  # any failure: not ready, said in one line
        reason = (
            f"database: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        )
        return web.json_response({"status": "error", "message": reason}, status=503)
    return web.json_response({"status": "success", "message": "ready"})
