"""API test helpers: the app in-process (aiohttp's TestClient, same event loop as the tests) for
handler tests, and a gunicorn server (penquins, schemathesis, several workers) for the smoke
tests. Modules get the in-process `api`/`users` fixtures from conftest.py; a module that needs
the real server binds `api = gunicorn_api` and `users = gunicorn_users`."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer
from bson import json_util
from multidict import CIMultiDictProxy
from penquins import Kowalski
from pymongo import MongoClient

from api.app import app_factory
from ingester.decode import decode_packet
from ingester.replay import ingest_files
from kowalski.config import Config, build_config
from kowalski.services.api import ApiServer
from kowalski.services.process import free_port

from .conftest import ztf_alert_files

ADMIN = ("admin", "admin")
TEST_USERS = (("public", {"ZTF": [1]}), ("partner", {"ZTF": [1, 2]}))


def loads(response: Any) -> Any:
    """The body as penquins reads it (MongoDB Extended JSON)."""
    return json_util.loads(response.text)


def decoded_alerts() -> list[dict[str, Any]]:
    return [decode_packet(p.read_bytes())[0] for p in ztf_alert_files()]


def ingested_config(test_environ: dict[str, str], prefix: str) -> tuple[Config, dict[str, str]]:
    """A configuration with a database of its own, holding the bundled ZTF alerts."""
    env = {**test_environ, "KOWALSKI__database__db": f"{prefix}_{uuid.uuid4().hex[:8]}"}
    cfg = build_config([], env)
    stored = ingest_files(cfg, ztf_alert_files())
    assert stored == {"ZTF": 38}
    return cfg, env


# ------------------------------------------------------------------ gunicorn


@dataclass
class Api:
    """The API served by gunicorn, called with requests (or penquins)."""

    url: str
    port: int
    cfg: Config
    db: Any

    def token(self, username: str, password: str) -> str:
        r = requests.post(f"{self.url}/api/auth", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        token: str = r.json()["token"]
        return token

    def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def query(self, token: str | None, body: dict[str, Any]) -> requests.Response:
        return self.call("POST", "/api/queries", token, json=body)

    def penquins(self, username: str = "admin", password: str = "admin") -> Kowalski:
        return Kowalski(
            username=username,
            password=password,
            protocol="http",
            host="127.0.0.1",
            port=self.port,
            timeout=30,
        )


class Scheduler(BaseHTTPRequestHandler):
    """The ZTF scheduler the trigger proxies forward to, as deployed: it accepts everything."""

    def answer(self, status: int, body: Any) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        self.answer(201, {"accepted": True})

    def do_GET(self) -> None:
        self.answer(200, [])

    def do_DELETE(self) -> None:
        self.answer(200, {"deleted": True})

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@contextmanager
def scheduler() -> Iterator[int]:
    """A stand-in ZTF scheduler on a free port (its port)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scheduler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module", name="api")
def gunicorn_api(
    test_environ: dict[str, str], mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    with scheduler() as port:
        ztf = {"KOWALSKI__ztf__mountain_ip": "127.0.0.1", "KOWALSKI__ztf__mountain_port": str(port)}
        yield from served_api({**test_environ, **ztf}, mongo_uri, tmp_path_factory)


def served_api(
    environ: dict[str, str], mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    cfg, env = ingested_config(environ, "api")
    port = free_port()
    server = ApiServer(
        cfg, port, tmp_path_factory.mktemp("api") / "gunicorn.log", env, workers=2
    ).start()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        yield Api(server.url, port, cfg, client[cfg.database.db])
    finally:
        server.stop()
        client.close()


@pytest.fixture(scope="module", name="users")
def gunicorn_users(api: Api) -> dict[str, str]:
    """Tokens for the permission matrix: public-only user, user with programid 2, admin."""
    admin = api.token(*ADMIN)
    for name, permissions in TEST_USERS:
        r = api.call(
            "POST",
            "/api/users",
            admin,
            json={"username": name, "password": name + "-pw", "permissions": permissions},
        )
        assert r.status_code == 200, r.text
    return {
        "admin": admin,
        "public": api.token("public", "public-pw"),
        "partner": api.token("partner", "partner-pw"),
    }


# ------------------------------------------------------------------ in-process


@dataclass
class Response:
    """What a test reads of an answer, named as in requests."""

    status_code: int
    content: bytes
    headers: CIMultiDictProxy[str]

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return json_util.loads(self.text)


@dataclass
class AppApi:
    """The API app in-process, called through aiohttp's test client."""

    client: TestClient[Any, Any]
    cfg: Config
    db: Any

    async def token(self, username: str, password: str) -> str:
        r = await self.call("POST", "/api/auth", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        return str(r.json()["token"])

    async def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> Response:
        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.client.request(method, path, headers=headers, **kwargs) as response:
            return Response(response.status, await response.read(), response.headers)

    async def query(self, token: str | None, body: dict[str, Any]) -> Response:
        return await self.call("POST", "/api/queries", token, json=body)


async def app_api(cfg: Config, mongo_uri: str) -> AsyncIterator[AppApi]:
    client: TestClient[Any, Any] = TestClient(TestServer(await app_factory(cfg)))
    await client.start_server()
    mongo: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        yield AppApi(client, cfg, mongo[cfg.database.db])
    finally:
        await client.close()
        mongo.close()


async def app_users(api: AppApi) -> dict[str, str]:
    """The same users and tokens as `gunicorn_users`."""
    admin = await api.token(*ADMIN)
    for name, permissions in TEST_USERS:
        body = {"username": name, "password": name + "-pw", "permissions": permissions}
        r = await api.call("POST", "/api/users", admin, json=body)
        assert r.status_code == 200, r.text
    return {
        "admin": admin,
        "public": await api.token("public", "public-pw"),
        "partner": await api.token("partner", "partner-pw"),
    }
