"""ZTF trigger proxies, in-process (aiohttp pytest plugin) against an in-test scheduler server."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from api.app import app_factory
from kowalski.config import build_config

QUEUE = {
    "queue_name": "ToO_test",
    "validity_window_mjd": [60000.0, 60001.0],
    "targets": [
        {
            "request_id": 1,
            "program_id": 2,
            "field_id": 699,
            "ra": 322.7,
            "dec": 27.8,
            "filter_id": 1,
            "exposure_time": 300.0,
            "program_pi": "Kulkarni",
            "subprogram_name": "ToO_Test",
        }
    ],
    "queue_type": "list",
    "user": "provisioned-admin",
}
MMA = {
    "trigger_name": "S230101a",
    "trigger_time": 2459945.5,
    "fields": [{"field_id": 550, "probability": 0.5}],
    "user": "admin",
}


async def client_for(
    aiohttp_client: Any, test_environ: dict[str, str], port: int | None
) -> tuple[Any, dict[str, str]]:
    env = {**test_environ, "KOWALSKI__database__db": f"triggers_{uuid.uuid4().hex[:8]}"}
    if port:
        env |= {
            "KOWALSKI__ztf__mountain_ip": "127.0.0.1",
            "KOWALSKI__ztf__mountain_port": str(port),
        }
    client = await aiohttp_client(await app_factory(build_config([], env)))
    auth = await client.post("/api/auth", json={"username": "admin", "password": "admin"})
    return client, {"Authorization": f"Bearer {(await auth.json())['token']}"}


async def test_test_routes_validate_without_proxying(
    aiohttp_client: Any, test_environ: dict[str, str]
) -> None:
    client, headers = await client_for(aiohttp_client, test_environ, None)
    for path, body, key in (
        ("/api/triggers/ztf.test", QUEUE, "queue_name"),
        ("/api/triggers/ztfmma.test", MMA, "trigger_name"),
    ):
        assert (await (await client.put(path, json=body, headers=headers)).json())[
            "message"
        ] == "submitted"
        r = await client.get(path, params={key: body[key], "user": body["user"]}, headers=headers)
        assert (await r.json())["message"] == "retrieved"
        r = await client.delete(path, json={key: body[key], "user": body["user"]}, headers=headers)
        assert (await r.json())["message"] == "deleted"
    bad = await client.put(
        "/api/triggers/ztf.test", json={**QUEUE, "validity_window_mjd": [2, 1]}, headers=headers
    )
    assert bad.status == 400 and "end must be after start" in (await bad.json())["message"]
    unconfigured = await client.put("/api/triggers/ztf", json=QUEUE, headers=headers)
    assert unconfigured.status == 503 and "not configured" in (await unconfigured.json())["message"]
    anonymous = await client.put("/api/triggers/ztf.test", json=QUEUE)
    assert anonymous.status == 401


async def test_proxy_to_the_scheduler(
    aiohttp_client: Any, aiohttp_server: Any, test_environ: dict[str, str]
) -> None:
    received: list[tuple[str, str, Any]] = []
    queues: set[str] = set()

    async def queues_handler(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else dict(request.query)
        received.append((request.method, request.path, body))
        if request.method == "PUT":
            status = 200 if body["queue_name"] in queues else 201
            queues.add(body["queue_name"])
            return web.json_response({"queue": body["queue_name"]}, status=status)
        return web.json_response([{"queue_name": q} for q in sorted(queues)])

    scheduler = web.Application()
    scheduler.router.add_route("*", "/queues", queues_handler)
    server = await aiohttp_server(scheduler)
    client, headers = await client_for(aiohttp_client, test_environ, server.port)

    first = await client.put("/api/triggers/ztf", json=QUEUE, headers=headers)
    assert first.status == 200 and (await first.json())["message"] == "submitted"
    again = await client.put("/api/triggers/ztf", json=QUEUE, headers=headers)
    assert again.status == 409 and "ToO_test already exists" in (await again.json())["message"]
    got = await client.get(
        "/api/triggers/ztf", params={"trigger_name": "ToO_test", "user": "admin"}, headers=headers
    )
    assert (await got.json())["data"] == [{"queue_name": "ToO_test"}]
    deleted = await client.delete(
        "/api/triggers/ztf", json={"queue_name": "ToO_test", "user": "admin"}, headers=headers
    )
    assert deleted.status == 200
    assert [(m, p) for m, p, _ in received] == [
        ("PUT", "/queues"),
        ("PUT", "/queues"),
        ("GET", "/queues"),
        ("DELETE", "/queues"),
    ]
    assert received[0][2]["targets"][0]["field_id"] == 699
    assert received[2][2] == {"queue_name": "ToO_test", "user": "admin"}
