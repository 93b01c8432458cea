"""Sky map URLs (PUT /api/skymap, admin only) are fetched only from public addresses: private,
loopback and link-local ones are refused, given literally, by name or by a redirect, unless
their network is in `server.skymap_fetch_allow` (issue #22 item 5). In-process API against the
real embedded database; the sky map is the real one of data/skymaps/, served on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.app import app_factory
from kowalski.config import ROOT, build_config

LOCALIZATION = ROOT / "data" / "skymaps" / "localization.fits"


@dataclass
class Setup:
    files: str  # the file server's URL
    calls: list[str]  # paths the file server was asked for


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    """A file server on 127.0.0.1: the real sky map, and redirects to it, to internal addresses
    and to itself."""
    calls: list[str] = []
    app = web.Application()

    async def serve(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        if request.path == "/localization.fits":
            return web.Response(body=LOCALIZATION.read_bytes())
        if request.path == "/loop":
            raise web.HTTPFound("/loop")
        target = request.query.get("to", "/localization.fits")
        raise web.HTTPFound(target)

    app.router.add_get("/{tail:.*}", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Setup(str(server.make_url("")).rstrip("/"), calls)
    finally:
        await server.close()


async def put_url(environ: dict[str, str], url: str) -> tuple[int, dict[str, Any]]:
    """PUT a sky map by URL as the admin of an API configured by `environ`."""
    cfg = build_config([], environ)
    client: TestClient[Any, Any] = TestClient(TestServer(await app_factory(cfg)))
    await client.start_server()
    try:
        auth = await client.post("/api/auth", json={"username": "admin", "password": "admin"})
        token = (await auth.json())["token"]
        body = {"dateobs": "2023-06-25T00:00:00", "skymap": {"url": url}}
        headers = {"Authorization": f"Bearer {token}"}
        async with client.put("/api/skymap", json=body, headers=headers) as response:
            return response.status, await response.json()
    finally:
        await client.close()


@pytest.fixture
def environ(test_environ: dict[str, str]) -> dict[str, str]:
    return {**test_environ, "KOWALSKI__database__db": f"skymap_fetch_{uuid.uuid4().hex[:8]}"}


INTERNAL = [
    "http://10.1.2.3/x.fits",
    "http://192.168.0.1/x.fits",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:9/x.fits",
    "http://[fe80::1]/x.fits",
    "http://[::ffff:127.0.0.1]:9/x.fits",
    "http://0.0.0.0:9/x.fits",
]


@pytest.mark.parametrize("url", INTERNAL)
async def test_internal_addresses_are_refused(environ: dict[str, str], url: str) -> None:
    status, body = await put_url(environ, url)
    assert status == 400 and "internal address" in body["message"], body


async def test_loopback_is_refused_unless_allow_listed(
    environ: dict[str, str], setup: Setup
) -> None:
    port = setup.files.rsplit(":", 1)[1]
    for url in (setup.files + "/localization.fits", f"http://localhost:{port}/localization.fits"):
        status, body = await put_url(environ, url)
        assert status == 400 and "internal address 127.0.0.1" in body["message"], body
    assert setup.calls == []  # nothing was asked of the server
    allowed = {**environ, "KOWALSKI__server__skymap_fetch_allow": "[127.0.0.1/32]"}
    status, body = await put_url(allowed, setup.files + "/localization.fits")
    assert status == 200 and body["data"]["localization_name"] == "localization.fits", body


async def test_redirects_are_checked_at_every_hop(environ: dict[str, str], setup: Setup) -> None:
    allowed = {**environ, "KOWALSKI__server__skymap_fetch_allow": "[127.0.0.1/32]"}
    for internal in ("http://127.0.0.2:9/x.fits", "http://169.254.169.254/latest/meta-data"):
        status, body = await put_url(allowed, f"{setup.files}/hop?to={internal}")
        assert status == 400 and "internal address" in body["message"], body
    # a redirect to an allowed address is followed
    status, body = await put_url(allowed, f"{setup.files}/hop")
    assert status == 200 and body["data"]["localization_name"] == "hop", body  # as upstream
    assert setup.calls[-2:] == ["/hop", "/localization.fits"]
    status, body = await put_url(allowed, f"{setup.files}/loop")
    assert status == 400 and "redirects" in body["message"], body
