"""Security and robustness of the API, in-process (aiohttp test client) against the real embedded
database holding the real ZTF alerts: data rights without oracles, joins and server stages refused
at any depth, token claims and revocation, default secrets, per-query deadlines and per-user query
slots, and bad input answered with a clear 4xx (issue #16 items 1, 2, 3, 4, 6, 11)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from bson import json_util
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.uri_parser import parse_uri

from api.app import app_factory
from api.queries import QUERY_SLOTS
from api.safety import backtracking_risk, has_nested_quantifier
from ingester.replay import ingest_files
from kowalski.config import ROOT, Config, ConfigError, build_config, local_api_env
from kowalski.services.process import free_port
from kowalski.testing.stall import StallingRelay

from .conftest import ztf_alert_files

SLOTS_PER_USER = 2
HISTORY = "ZTF_alerts_aux"
CATASTROPHIC = {"$expr": {"$regexMatch": {"input": "a" * 24, "regex": "(a+)+b$"}}}


@dataclass
class Env:
    cfg: Config
    environ: dict[str, str]
    db: Database[dict[str, Any]]


@pytest.fixture(scope="module")
def env(test_environ: dict[str, str], mongo_uri: str) -> Iterator[Env]:
    environ = {
        **test_environ,
        "KOWALSKI__database__db": f"security_{uuid.uuid4().hex[:8]}",
        "KOWALSKI__misc__max_concurrent_queries": str(SLOTS_PER_USER),
    }
    cfg = build_config([], environ)
    assert ingest_files(cfg, ztf_alert_files()) == {"ZTF": 38}
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        yield Env(cfg, environ, client[cfg.database.db])
    finally:
        client.close()


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    tokens: dict[str, str]

    async def call(
        self, method: str, path: str, who: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if who:
            headers["Authorization"] = f"Bearer {self.tokens.get(who, who)}"
        async with self.client.request(method, path, headers=headers, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, json_util.loads(text)
            except ValueError:
                return response.status, text

    async def query(self, who: str, body: dict[str, Any]) -> tuple[int, Any]:
        return await self.call("POST", "/api/queries", who, json=body)

    async def login(self, username: str, password: str) -> str:
        status, body = await self.call(
            "POST", "/api/auth", json={"username": username, "password": password}
        )
        assert status == 200, body
        return str(body["token"])

    async def add_user(self, username: str, password: str, **extra: Any) -> None:
        body = {"username": username, "password": password, **extra}
        status, answer = await self.call("POST", "/api/users", "admin", json=body)
        assert status == 200, answer


@pytest.fixture(scope="module")
async def api(env: Env) -> AsyncIterator[Api]:
    client: TestClient[Any, Any] = TestClient(TestServer(await app_factory(env.cfg)))
    await client.start_server()
    try:
        api = Api(client, {})
        api.tokens["admin"] = await api.login("admin", "admin")
        for name, programids in (("public", [1]), ("partner", [1, 2])):
            await api.add_user(name, name + "-pw", permissions={"ZTF": programids})
            api.tokens[name] = await api.login(name, name + "-pw")
        yield api
    finally:
        await client.close()


def data(answer: tuple[int, Any]) -> Any:
    status, body = answer
    assert status == 200, body
    return body.get("data")


# ------------------------------------------------------------------ 1. data rights, no oracles


def hidden_point(db: Database[dict[str, Any]]) -> tuple[str, int, float]:
    """(objectId, programid, magpsf) of a history point only partners/admins may see."""
    for doc in db[HISTORY].find({}, {"prv_candidates": 1}):
        for point in doc.get("prv_candidates") or []:
            if point.get("programid") not in (None, 1) and point.get("magpsf") is not None:
                return doc["_id"], point["programid"], float(point["magpsf"])
    raise AssertionError("the bundled alerts have no hidden history point")


def probe(object_id: str, programid: int, above: float) -> dict[str, Any]:
    """'Is there a hidden point of `programid` brighter than `above`?'"""
    return {
        "_id": object_id,
        "prv_candidates": {"$elemMatch": {"programid": programid, "magpsf": {"$gt": above}}},
    }


def oracle_queries(flt: dict[str, Any]) -> list[dict[str, Any]]:
    """The same question through every query type that takes a filter on the history."""
    negated = {"_id": flt["_id"], "$nor": [{"prv_candidates": flt["prv_candidates"]}]}
    return [
        {"query_type": "count_documents", "query": {"catalog": HISTORY, "filter": flt}},
        {"query_type": "find", "query": {"catalog": HISTORY, "filter": flt}},
        {"query_type": "find", "query": {"catalog": HISTORY, "filter": negated}},
        {"query_type": "find_one", "query": {"catalog": HISTORY, "filter": {"$or": [flt]}}},
        {"query_type": "find_one", "query": {"catalog": HISTORY, "filter": negated}},
        {
            "query_type": "aggregate",
            "query": {"catalog": HISTORY, "pipeline": [{"$match": flt}, {"$count": "n"}]},
        },
        {"query_type": "count_documents", "query": {"catalog": HISTORY, "filter": negated}},
    ]


async def test_history_filters_never_see_hidden_points(api: Api, env: Env) -> None:
    object_id, programid, magpsf = hidden_point(env.db)
    below, above = probe(object_id, programid, magpsf - 1e-3), probe(object_id, programid, 99.0)
    # the admin sees the point: the probe does discriminate
    assert data(await api.query("admin", oracle_queries(below)[0])) == 1
    assert data(await api.query("admin", oracle_queries(above)[0])) == 0
    for who in ("public",) + (("partner",) if programid == 3 else ()):
        for yes, no in zip(oracle_queries(below), oracle_queries(above), strict=True):
            assert data(await api.query(who, yes)) == data(await api.query(who, no)), yes
        # counts say "no such point", as the user's view of the document does
        assert data(await api.query(who, oracle_queries(below)[0])) == 0


async def test_info_counts_show_only_permitted_alerts(api: Api) -> None:
    info = {"query_type": "info", "query": {"command": "catalog_info", "catalog": "ZTF_alerts"}}
    assert data(await api.query("admin", info))["count"] == 38
    public = data(await api.query("public", info))
    assert public["count"] == 37 and "size" not in public
    db_info = {"query_type": "info", "query": {"command": "db_info"}}
    admin_objects = data(await api.query("admin", db_info))["objects"]
    assert data(await api.query("public", db_info))["objects"] == admin_objects - 1


async def test_near_on_history_applies_the_restriction_first(api: Api, env: Env) -> None:
    doc = env.db["ZTF_alerts"].find_one({"candidate.programid": 1}, {"candidate": 1})
    assert doc is not None
    radec = {"here": [doc["candidate"]["ra"], doc["candidate"]["dec"]]}
    body = {
        "query_type": "near",
        "query": {
            "max_distance": 5,
            "distance_units": "arcsec",
            "radec": radec,
            "catalogs": {"ZTF_alerts": {"filter": {"candidate.programid": {"$ne": 1}}}},
        },
    }
    assert data(await api.query("public", body))["ZTF_alerts"]["here"] == []


# ------------------------------------------------------------------ 2. joins and server stages


def nested_join(target: str) -> list[dict[str, Any]]:
    lookup = {"from": target, "localField": "a", "foreignField": "_id", "as": "u"}
    return [{"$facet": {"u": [{"$lookup": lookup}]}}]


async def test_filters_refuse_joins_at_any_depth(api: Api) -> None:
    base = {"group_id": 1, "filter_id": 41, "catalog": "ZTF_alerts", "permissions": [1]}
    status, body = await api.call(
        "POST", "/api/filters", "admin", json={**base, "pipeline": nested_join("users")}
    )
    assert status == 403 and "forbidden stages" in body["message"], body
    graph = [
        {
            "$facet": {
                "g": [
                    {
                        "$graphLookup": {
                            "from": "system.views",
                            "startWith": "$a",
                            "connectFromField": "a",
                            "connectToField": "b",
                            "as": "g",
                        }
                    }
                ]
            }
        }
    ]
    status, body = await api.call("POST", "/api/filters", "admin", json={**base, "pipeline": graph})
    assert status in (400, 403), body
    status, body = await api.call(
        "POST", "/api/filters", "admin", json={**base, "pipeline": [{"$match": {}}]}
    )
    assert status == 200, body
    for option in ("autosave", "auto_followup"):
        patch: dict[str, Any] = {
            "filter_id": 41,
            "autosave": {"active": True, "pipeline": [{"$match": {}}]},
        }
        patch[option] = {"active": True, "pipeline": nested_join("users")}
        status, body = await api.call("PATCH", "/api/filters", "admin", json=patch)
        assert status == 403 and "forbidden stages" in body["message"], (option, body)


@pytest.mark.parametrize(
    "stage",
    [
        {"$changeStream": {}},
        {"$collStats": {"count": {}}},
        {"$indexStats": {}},
        {"$currentOp": {}},
        {"$planCacheStats": {}},
        {"$facet": {"x": [{"$lookup": {"from": "system.users", "as": "u", "pipeline": []}}]}},
        {"$facet": {"x": [{"$lookup": {"from": "filters", "as": "u", "pipeline": []}}]}},
    ],
)
async def test_queries_refuse_server_stages_and_protected_joins(
    api: Api, stage: dict[str, Any]
) -> None:
    body = {"query_type": "aggregate", "query": {"catalog": "ZTF_alerts", "pipeline": [stage]}}
    status, answer = await api.query("public", body)
    assert status == 403, answer
    assert answer["status"] == "error"


@pytest.mark.parametrize(
    "key",
    ["results_outbox", "skyportal_outbox", "skyportal_objects", "handoffs", "dead_letters"],
)
async def test_outboxes_and_ledgers_are_protected(api: Api, env: Env, key: str) -> None:
    """They hold alerts and passes of every programid (a partnership filter's results-stream
    records among them): a user's query reads none of them, directly or by a join."""
    name = env.cfg.database.collection(key)  # type: ignore[arg-type]
    env.db[name].insert_one({"_id": f"probe-{key}", "programid": 2})
    find = {"query_type": "find", "query": {"catalog": name, "filter": {}}}
    status, answer = await api.query("public", find)
    assert status == 403 and "protected" in answer["message"], answer
    join = {"$lookup": {"from": name, "as": "x", "pipeline": []}}
    body = {"query_type": "aggregate", "query": {"catalog": "ZTF_alerts", "pipeline": [join]}}
    assert (await api.query("public", body))[0] == 403
    assert data(await api.query("admin", find))  # admins still read them


# ------------------------------------------------------------------ 3. tokens


def forge(env: Env, payload: dict[str, Any], secret: str | None = None) -> str:
    return jwt.encode(payload, secret or env.cfg.server.JWT_SECRET_KEY, algorithm="HS256")


async def test_tokens_need_iat_user_id_and_generation(api: Api, env: Env) -> None:
    admin = env.db["users"].find_one({"_id": "admin"})
    assert admin is not None
    now = int(dt.datetime.now(dt.UTC).timestamp())
    full = {"user_id": "admin", "iat": now, "uid": admin["uid"], "gen": admin["token_generation"]}
    assert (await api.call("GET", "/", forge(env, full)))[0] == 200
    for missing in ("iat", "uid", "gen"):
        token = forge(env, {k: v for k, v in full.items() if k != missing})
        status, body = await api.call("GET", "/", token)
        assert status == 401 and body["message"] == "Unauthorized", (missing, body)
    status, body = await api.call("GET", "/", forge(env, {"user_id": "admin"}))
    assert status == 401 and body == {
        "status": "error",
        "message": "Unauthorized",
        "reason": body["reason"],
    }


async def test_deleted_and_recreated_user_does_not_get_old_tokens_back(api: Api) -> None:
    await api.add_user("phoenix", "one")
    old = await api.login("phoenix", "one")
    assert (await api.call("GET", "/", old))[0] == 200
    assert (await api.call("DELETE", "/api/users/phoenix", "admin"))[0] == 200
    await api.add_user("phoenix", "one")
    status, body = await api.call("GET", "/", old)
    assert status == 401 and body["message"] == "Unauthorized"
    # renamed away and the name reused: the old name's tokens stay dead
    renamed = await api.login("phoenix", "one")
    status, _ = await api.call("PUT", "/api/users/phoenix", "admin", json={"username": "ash"})
    assert status == 200
    await api.add_user("phoenix", "two")
    assert (await api.call("GET", "/", renamed))[0] == 401
    for name in ("phoenix", "ash"):
        assert (await api.call("DELETE", f"/api/users/{name}", "admin"))[0] == 200


async def test_password_change_and_admin_revoke_bump_the_generation(api: Api) -> None:
    await api.add_user("rotating", "one")
    old = await api.login("rotating", "one")
    status, _ = await api.call("PUT", "/api/users/rotating", "admin", json={"password": "two"})
    assert status == 200
    new = await api.login("rotating", "two")  # same second as the change: must work
    assert (await api.call("GET", "/", new))[0] == 200
    status, body = await api.call("GET", "/", old)
    assert status == 401 and body["message"] == "Unauthorized" and "revoked" in body["reason"]
    # an admin revokes every token of the user
    status, body = await api.call("POST", "/api/users/rotating/revoke", "public")
    assert status == 403, body
    status, body = await api.call("POST", "/api/users/rotating/revoke", "admin")
    assert status == 200, body
    assert (await api.call("GET", "/", new))[0] == 401
    assert (await api.call("GET", "/", await api.login("rotating", "two")))[0] == 200
    assert (await api.call("POST", "/api/users/nobody/revoke", "admin"))[0] == 404
    assert (await api.call("DELETE", "/api/users/rotating", "admin"))[0] == 200


async def test_bad_tokens_are_401_and_public_routes_ignore_them(api: Api, env: Env) -> None:
    admin = env.db["users"].find_one({"_id": "admin"})
    assert admin is not None
    now = int(dt.datetime.now(dt.UTC).timestamp())
    claims = {"user_id": "admin", "uid": admin["uid"], "gen": admin["token_generation"]}
    tokens = {
        "forged": forge(env, {**claims, "iat": now}, secret="not-the-secret"),
        "expired": forge(env, {**claims, "iat": now - 100, "exp": now - 10}),
        "garbled": api.tokens["admin"][:-6] + "xxxxxx",
        "no_token": "no_token",
        "two words": "Token abc def",
    }
    for name, token in tokens.items():
        status, body = await api.call("GET", "/", headers={"Authorization": token})
        assert status == 401 and body["message"] == "Unauthorized", (name, body)
    status, body = await api.call(
        "POST",
        "/api/auth",
        headers={"Authorization": "Bearer stale"},
        json={"username": "admin", "password": "admin"},
    )
    assert status == 200 and body["token"], body
    status, _ = await api.call(
        "GET", "/docs/api/openapi.json", headers={"Authorization": "Bearer stale"}
    )
    assert status == 200
    status, body = await api.call(
        "POST", "/api/auth", json={"username": "admin", "password": "wrong"}
    )
    assert status == 401 and body["message"] == "Unauthorized" and "wrong" in body["reason"]


async def test_unknown_users_cost_one_bcrypt_check_like_known_ones(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No username enumeration by timing: every failed login runs one full bcrypt check of the
    users' cost (counted: checks that ran to the end, and the cost of the hash they checked)."""
    real_check = bcrypt.checkpw
    done: list[bytes] = []

    def counted(password: bytes, hashed: bytes) -> bool:
        result = real_check(password, hashed)
        done.append(hashed[:7])
        return result

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    for username in ("public", "no-such-user-" + uuid.uuid4().hex[:6]):
        done.clear()
        status, body = await api.call(
            "POST", "/api/auth", json={"username": username, "password": "wrong"}
        )
        assert status == 401 and "wrong username or password" in body["reason"], body
        assert done == [b"$2b$12$"], (username, done)


async def test_passwords_longer_than_bcrypt_reads_are_a_clear_400(api: Api) -> None:
    long_password = "é" * 37  # 74 bytes in UTF-8
    status, body = await api.call(
        "POST", "/api/users", "admin", json={"username": "longpw", "password": long_password}
    )
    assert status == 400 and "password is longer than 72 bytes" in body["message"], body
    await api.add_user("longpw", "p" * 72)
    status, body = await api.call(
        "PUT", "/api/users/longpw", "admin", json={"password": long_password}
    )
    assert status == 400 and "password is longer than 72 bytes" in body["message"], body
    assert await api.login("longpw", "p" * 72)
    assert (await api.call("DELETE", "/api/users/longpw", "admin"))[0] == 200


async def test_token_ttl_sets_the_expiry(env: Env) -> None:
    cfg = build_config([], {**env.environ, "KOWALSKI__server__token_ttl": "600"})
    client: TestClient[Any, Any] = TestClient(TestServer(await app_factory(cfg)))
    await client.start_server()
    try:
        token = await Api(client, {}).login("admin", "admin")
    finally:
        await client.close()
    claims = jwt.decode(token, cfg.server.JWT_SECRET_KEY, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 600


# ------------------------------------------------------------------ 4. default secrets


def default_environ(test_environ: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in test_environ.items() if not k.startswith("KOWALSKI")},
        **extra,
    }


async def test_default_secrets_are_refused_unless_insecure_dev(
    test_environ: dict[str, str],
) -> None:
    defaults = build_config([], default_environ(test_environ))
    with pytest.raises(ConfigError, match="JWT_SECRET_KEY"):
        await app_factory(defaults)
    password_only = build_config(
        [], default_environ(test_environ, KOWALSKI_JWT_SECRET_KEY="s" * 32)
    )
    with pytest.raises(ConfigError, match="admin_password"):
        await app_factory(password_only)
    dev = build_config([], default_environ(test_environ, KOWALSKI__server__insecure_dev="true"))
    assert await app_factory(dev) is not None
    explicit = build_config(
        [],
        default_environ(
            test_environ, KOWALSKI_JWT_SECRET_KEY="s" * 32, KOWALSKI_ADMIN_PASSWORD="p" * 16
        ),
    )
    assert await app_factory(explicit) is not None
    short = build_config(
        [],
        default_environ(
            test_environ, KOWALSKI_JWT_SECRET_KEY="s" * 31, KOWALSKI_ADMIN_PASSWORD="p" * 16
        ),
    )
    with pytest.raises(ConfigError, match="shorter than 32 bytes") as refused:
        await app_factory(short)
    assert "\n" not in str(refused.value)
    short_dev = {"KOWALSKI_JWT_SECRET_KEY": "s" * 31, "KOWALSKI__server__insecure_dev": "true"}
    assert await app_factory(build_config([], default_environ(test_environ, **short_dev)))


def test_python_m_api_refuses_default_secrets_in_one_line(test_environ: dict[str, str]) -> None:
    environ = default_environ(
        test_environ,
        KOWALSKI_CONFIG=str(ROOT / "no-such-config.yaml"),
        KOWALSKI__server__host="127.0.0.1",
        KOWALSKI__server__port=str(free_port()),
    )
    result = subprocess.run(
        [sys.executable, "-m", "api"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "JWT_SECRET_KEY" in lines[0], result.stderr


def test_local_mode_binds_loopback_with_a_generated_secret(
    tmp_path: Path, test_environ: dict[str, str]
) -> None:
    cfg = build_config([], default_environ(test_environ))
    first = local_api_env(cfg, tmp_path)
    assert first["KOWALSKI__server__host"] == "127.0.0.1"
    secret = first["KOWALSKI_JWT_SECRET_KEY"]
    assert len(secret) >= 32 and secret != cfg.server.JWT_SECRET_KEY
    assert (tmp_path / "jwt_secret").stat().st_mode & 0o077 == 0
    assert local_api_env(cfg, tmp_path)["KOWALSKI_JWT_SECRET_KEY"] == secret  # reused
    served = build_config([], {**default_environ(test_environ), **first})
    assert served.server.host == "127.0.0.1" and secret == served.server.JWT_SECRET_KEY


# ------------------------------------------------------------------ 6. availability


def test_nested_quantifiers_detected() -> None:
    for bad in ("(a+)+b$", "(a*)*", "(?:ab+){2,}", r"(\w+\s?)+$", "((ab)*c)+"):
        assert has_nested_quantifier(bad), bad
    for good in ("^ZTF2[0-9]+", "(ab)+", r"\d+\.\d*", "a+b+", "[(]+)+", "(ZTF|PGIR)"):
        assert not has_nested_quantifier(good), good


CATASTROPHIC_PATTERNS = [
    "(a|a)*b",
    "(?:a|b|ab)*c",
    "([a-z]|[a-z0-9])+$",
    r"\d*\d*\d*x",
    "(a+)+b$",
    "(a*)*",
    "(?:ab+){2,}",
    r"(\w+\s?)+$",
    "((ab)*c)+",
    "(|a)+",
]
ORDINARY_PATTERNS = ["^ZTF2[0-9]", "abc.*", "^ZTF2[0-9]+", r"\d+\.\d*", "(ZTF|PGIR)+", "ZTF.*a"]


def test_backtracking_risks_detected() -> None:
    for bad in CATASTROPHIC_PATTERNS:
        assert backtracking_risk(bad), bad
    for good in ORDINARY_PATTERNS:
        assert backtracking_risk(good) is None, good


@pytest.mark.parametrize("pattern", CATASTROPHIC_PATTERNS)
async def test_catastrophic_regexes_are_a_clear_400(api: Api, pattern: str) -> None:
    flt = {"objectId": {"$regex": pattern}}
    body = {"query_type": "count_documents", "query": {"catalog": "ZTF_alerts", "filter": flt}}
    status, answer = await api.query("public", body)
    assert status == 400 and "catastrophic backtracking" in answer["message"], answer


async def test_ordinary_regexes_pass(api: Api) -> None:
    for pattern in ORDINARY_PATTERNS:
        flt = {"objectId": {"$regex": pattern}}
        body = {"query_type": "count_documents", "query": {"catalog": "ZTF_alerts", "filter": flt}}
        status, answer = await api.query("public", body)
        assert status == 200, (pattern, answer)


@contextlib.asynccontextmanager
async def relayed_api(
    env: Env, mongo_uri: str, who: str, password: str, **settings: str
) -> AsyncIterator[tuple[Api, StallingRelay]]:
    """An API (its config `env`'s plus `settings`) whose database replies go through a relay the
    test can hold: "the server did not answer in time" on any machine, however fast. `who` is
    logged in, cached and connected before it is handed over."""
    host, port = parse_uri(mongo_uri)["nodelist"][0]
    with StallingRelay(host, port) as relay:
        environ = {**env.environ, **settings, "MONGODB_URI": relay.mongodb_uri(mongo_uri)}
        client: TestClient[Any, Any] = TestClient(
            TestServer(await app_factory(build_config([], environ)))
        )
        await client.start_server()
        try:
            api = Api(client, {})
            api.tokens[who] = await api.login(who, password)
            assert data(await api.query(who, {**COUNT, "kwargs": {"max_time_ms": 60_000}}))
            yield api, relay
        finally:
            await client.close()


COUNT = {"query_type": "count_documents", "query": {"catalog": "ZTF_alerts", "filter": {}}}


async def held_query(api: Api, relay: StallingRelay, who: str, body: dict[str, Any]) -> Any:
    with relay.held():
        status, answer = await asyncio.wait_for(api.query(who, body), timeout=30)
    assert status == 400 and "query exceeded max_time_ms" in answer["message"], answer
    return answer


async def test_non_admin_queries_with_a_regex_get_the_short_deadline(
    env: Env, mongo_uri: str
) -> None:
    """The backstop: whatever max_time_ms a non-admin asks for, a query with a regular
    expression runs at most misc.regex_max_time_ms (the server's replies held back, as in
    test_query_deadline_is_the_apis)."""
    flt = {"objectId": {"$regex": "^ZTF"}}
    body = {
        "query_type": "count_documents",
        "query": {"catalog": "ZTF_alerts", "filter": flt},
        "kwargs": {"max_time_ms": 600_000},
    }
    async with relayed_api(
        env, mongo_uri, "public", "public-pw", KOWALSKI__misc__regex_max_time_ms="50"
    ) as (api, relay):
        answer = await held_query(api, relay, "public", body)
        assert "(50 ms)" in answer["message"], answer


async def test_query_deadline_is_the_apis(env: Env, mongo_uri: str) -> None:
    """A server that does not answer in time (its replies held back by a relay, the same on any
    machine; neither embedded server checks maxTimeMS inside one document's expression either):
    the API's own deadline (max_time_ms + 0.5 s) answers 400, and the next query, with the server
    answering again, succeeds."""
    async with relayed_api(env, mongo_uri, "admin", "admin") as (api, relay):
        await held_query(api, relay, "admin", {**COUNT, "kwargs": {"max_time_ms": 50}})
        assert data(await api.query("admin", {**COUNT, "kwargs": {"max_time_ms": 60_000}})) == 38


async def test_concurrent_queries_per_user_are_capped(api: Api) -> None:
    slots = api.client.app[QUERY_SLOTS]
    semaphore = slots.semaphore("public")
    count = {"query_type": "count_documents", "query": {"catalog": "ZTF_alerts", "filter": {}}}
    for _ in range(SLOTS_PER_USER):
        await semaphore.acquire()  # the user's heavy queries are running
    try:
        status, body = await api.query("public", {**count, "kwargs": {"max_time_ms": 100}})
        assert status == 429 and "too many concurrent queries" in body["message"], body
        assert data(await api.query("partner", count)) == 37  # other users are not held up
    finally:
        for _ in range(SLOTS_PER_USER):
            semaphore.release()
    assert data(await api.query("public", count)) == 37


# ------------------------------------------------------------------ 11. bad input
# (`PUT /api/skymap` with `"aliases": 5` is covered by tests/test_skymaps.py)


def find_body(flt: str) -> str:
    return f'{{"query_type": "find", "query": {{"catalog": "ZTF_alerts", "filter": {flt}}}}}'


BAD_BODIES = {
    "invalid $oid": find_body('{"_id": {"$oid": "zz"}}'),
    "invalid $numberDecimal": find_body('{"a": {"$numberDecimal": "abc"}}'),
    "string $timestamp": find_body('{"a": {"$timestamp": {"t": "x", "i": 1}}}'),
    "huge $date": find_body('{"a": {"$date": 1e300}}'),
    "bad $dbPointer": find_body('{"a": {"$dbPointer": 5}}'),
    "nested 1000 deep": find_body('{"a": ' + "[" * 1000 + "]" * 1000 + "}"),
    "NaN radius": json.dumps(
        {
            "query_type": "cone_search",
            "query": {
                "object_coordinates": {"cone_search_radius": float("nan"), "radec": {"a": [1, 1]}},
                "catalogs": {"ZTF_alerts": {}},
            },
        }
    ),
    "catalog with NUL": find_body("{}").replace("ZTF_alerts", "ZTF\\u0000alerts"),
    "catalog with ..": find_body("{}").replace("ZTF_alerts", "ZTF..alerts"),
    "catalog with a leading dot": find_body("{}").replace("ZTF_alerts", ".ZTF_alerts"),
    "cone catalog with ..": json.dumps(
        {
            "query_type": "cone_search",
            "query": {
                "object_coordinates": {"cone_search_radius": 1, "radec": {"a": [1, 1]}},
                "catalogs": {"a..b": {}},
            },
        }
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
async def test_bad_query_input_is_a_clear_400(api: Api, case: str) -> None:
    headers = {"Content-Type": "application/json"}
    status, body = await api.call(
        "POST", "/api/queries", "public", data=BAD_BODIES[case], headers=headers
    )
    assert status == 400, (case, body)
    assert body["status"] == "error" and body["message"], body


async def test_bad_encodings_and_forms_are_a_clear_400(api: Api) -> None:
    body = '{"username": "admin", "password": "admin"}'
    status, answer = await api.call(
        "POST",
        "/api/auth",
        data=body.encode(),
        headers={"Content-Type": "application/json; charset=no-such-charset"},
    )
    assert status == 400 and "charset" in answer["message"], answer
    status, answer = await api.call(
        "POST",
        "/api/auth",
        data=b"--xyz\r\nnot a part\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert status == 400, answer
