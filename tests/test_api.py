"""The API served by gunicorn (uvloop worker) on a free port, driven by the real penquins 2.4.2
client and plain HTTP. The archive holds the real ZTF alerts, stored by the ingester's pipeline."""

from __future__ import annotations

import datetime as dt
import gzip
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from bson import json_util
from penquins import Kowalski
from pymongo import MongoClient

from ingester.decode import decode_packet
from ingester.replay import ingest_files
from kowalski.config import Config, build_config
from kowalski.coords import great_circle_distance
from kowalski.services._process import free_port
from kowalski.services.api import ApiServer

from .conftest import ZTF_ALERTS, ztf_alert_files

ADMIN = ("admin", "admin")


@dataclass
class Api:
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


def loads(response: requests.Response) -> Any:
    return json_util.loads(response.text)


@pytest.fixture(scope="module")
def api(
    test_environ: dict[str, str], mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    db_name = f"api_{uuid.uuid4().hex[:8]}"
    env = {**test_environ, "KOWALSKI__database__db": db_name}
    cfg = build_config([], env)
    stored = ingest_files(cfg, ztf_alert_files())
    assert stored == {"ZTF": 38}
    port = free_port()
    server = ApiServer(
        cfg, port, tmp_path_factory.mktemp("api") / "gunicorn.log", env, workers=2
    ).start()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        yield Api(server.url, port, cfg, client[db_name])
    finally:
        server.stop()
        client.close()


@pytest.fixture(scope="module")
def users(api: Api) -> dict[str, str]:
    """Tokens for the permission matrix: public-only user, user with programid 2, admin."""
    admin = api.token(*ADMIN)
    for name, permissions in (("public", {"ZTF": [1]}), ("partner", {"ZTF": [1, 2]})):
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


def decoded_alerts() -> list[dict[str, Any]]:
    return [decode_packet(p.read_bytes())[0] for p in ztf_alert_files()]


# ------------------------------------------------------------------ penquins


def test_penquins_password_and_token_auth_ping(api: Api) -> None:
    k = api.penquins()
    assert k.ping()
    token = k.instances["default"]["token"]
    by_token = Kowalski(token=token, protocol="http", host="127.0.0.1", port=api.port)
    assert by_token.ping()


def test_penquins_info_catalog_names(api: Api, users: dict[str, str]) -> None:
    names = api.penquins().query({"query_type": "info", "query": {"command": "catalog_names"}})[
        "default"
    ]["data"]
    assert "ZTF_alerts" in names and "ZTF_alerts_aux" in names
    assert names == sorted(names, reverse=True)
    public = api.penquins("public", "public-pw").query(
        {"query_type": "info", "query": {"command": "catalog_names"}}
    )
    assert "users" not in public["default"]["data"] and "filters" not in public["default"]["data"]


def test_penquins_cone_search_returns_exactly_the_alerts_at_real_positions(api: Api) -> None:
    alerts = decoded_alerts()
    radec = {str(a["candid"]): [a["candidate"]["ra"], a["candidate"]["dec"]] for a in alerts}
    q = {
        "query_type": "cone_search",
        "query": {
            "object_coordinates": {
                "cone_search_radius": 2,
                "cone_search_unit": "arcsec",
                "radec": radec,
            },
            "catalogs": {
                "ZTF_alerts": {"filter": {}, "projection": {"_id": 0, "candid": 1, "objectId": 1}}
            },
        },
        "kwargs": {"filter_first": False},
    }
    response = api.penquins().query(q)["default"]
    assert response["status"] == "success" and response["message"] == "Successfully executed query"
    data = response["data"]["ZTF_alerts"]
    assert set(data) == set(radec)
    for name, (ra, dec) in radec.items():
        expected = {
            a["candid"]
            for a in alerts
            if great_circle_distance(ra, dec, a["candidate"]["ra"], a["candidate"]["dec"]) * 3600
            <= 2
        }
        assert {d["candid"] for d in data[name]} == expected
        assert int(name) in expected


def test_cone_search_sexagesimal_and_list_forms(api: Api) -> None:
    k = api.penquins()
    # ZTF19abzrhgq at 71.6577756, -10.2263957 (upstream's documented example)
    q: dict[str, Any] = {
        "query_type": "cone_search",
        "query": {
            "object_coordinates": {
                "cone_search_radius": 5,
                "cone_search_unit": "arcsec",
                "radec": "04:46:37.866 -10:13:34.98",
            },
            "catalogs": {"ZTF_alerts": {"projection": {"_id": 0, "objectId": 1}}},
        },
    }
    data = k.query(q)["default"]["data"]["ZTF_alerts"]
    assert [d["objectId"] for docs in data.values() for d in docs] == ["ZTF19abzrhgq"]
    q["query"]["object_coordinates"]["radec"] = [[71.6577756, -10.2263957]]
    data = k.query(q)["default"]["data"]["ZTF_alerts"]
    assert list(data) == ["[71_6577756, -10_2263957]"]


def test_penquins_near(api: Api) -> None:
    q = {
        "query_type": "near",
        "query": {
            "max_distance": 2,
            "distance_units": "arcsec",
            "radec": {"query_coords": [185.7288484, 15.8236168]},
            "catalogs": {
                "ZTF_alerts": {"filter": {}, "projection": {"_id": 0, "candid": 1, "objectId": 1}}
            },
        },
        "kwargs": {"max_time_ms": 10000, "limit": 7},
    }
    data = api.penquins().query(q)["default"]["data"]["ZTF_alerts"]["query_coords"]
    assert [d["objectId"] for d in data] == ["ZTF20aaelulu"]


def test_penquins_find_find_one_count_aggregate(api: Api) -> None:
    k = api.penquins()
    found = k.query(
        {
            "query_type": "find",
            "query": {
                "catalog": "ZTF_alerts",
                "filter": {"candidate.drb": {"$gt": 0.9}},
                "projection": {"_id": 0, "candid": 1, "candidate.drb": 1},
            },
            "kwargs": {"sort": [["candidate.drb", -1]], "limit": 3},
        }
    )["default"]["data"]
    assert len(found) == 3 and found[0]["candidate"]["drb"] >= found[-1]["candidate"]["drb"]
    assert set(found[0]) == {"candid", "candidate"}
    one = k.query(
        {
            "query_type": "find_one",
            "query": {
                "catalog": "ZTF_alerts",
                "filter": {"candid": 1127561445515015011},
                "projection": {"_id": 0, "objectId": 1},
            },
        }
    )["default"]["data"]
    assert one == {"objectId": "ZTF20aajcbhr"}  # projection honoured (upstream ignored it)
    count = k.query(
        {
            "query_type": "count_documents",
            "query": {"catalog": "ZTF_alerts", "filter": {"candid": {"$lt": 0}}},
        }
    )
    assert count["default"]["data"] == 0
    agg = k.query(
        {
            "query_type": "aggregate",
            "query": {
                "catalog": "ZTF_alerts",
                "pipeline": [
                    {"$match": {"candid": 1127561445515015011}},
                    {"$project": {"_id": 0, "candid": 1}},
                ],
            },
        }
    )
    assert agg["default"]["data"] == [{"candid": 1127561445515015011}]
    est = k.query({"query_type": "estimated_document_count", "query": {"catalog": "ZTF_alerts"}})
    assert est["default"]["data"] == 38


def test_sort_as_mapping_skip_and_hint(api: Api, users: dict[str, str]) -> None:
    body = {
        "query_type": "find",
        "query": {"catalog": "ZTF_alerts", "filter": {}, "projection": {"_id": 0, "candid": 1}},
        "kwargs": {"sort": {"candid": 1}, "skip": 2, "limit": 3, "hint": "candid"},
    }
    data = loads(api.query(users["admin"], body))["data"]
    all_candids = sorted(a["candid"] for a in decoded_alerts())
    assert [d["candid"] for d in data] == all_candids[2:5]


def test_cutouts_come_back_as_binary_extended_json(api: Api) -> None:
    doc = api.penquins().query(
        {
            "query_type": "find_one",
            "query": {
                "catalog": "ZTF_alerts",
                "filter": {"candid": 1127561445515015011},
                "projection": {"_id": 0, "cutoutScience": 1},
            },
        }
    )["default"]["data"]
    assert gzip.decompress(doc["cutoutScience"]["stampData"])[:6] == b"SIMPLE"


def test_penquins_filters_lifecycle(api: Api) -> None:
    k = api.penquins()
    pipeline = [
        {"$match": {"candidate.drb": {"$gt": 0.5}}},
        {"$project": {"_id": 0, "candid": 1, "objectId": 1}},
    ]
    created = k.api(
        "post",
        "/api/filters",
        {
            "group_id": 1,
            "filter_id": 7,
            "catalog": "ZTF_alerts",
            "permissions": [1, 2],
            "pipeline": pipeline,
        },
    )
    assert created["status"] == "success", created
    fid = created["data"]["fid"]
    got = k.api("get", "/api/filters/7")
    assert (
        got["data"]["active_fid"] == fid
        and got["data"]["autosave"] is False
        and got["data"]["auto_followup"] == {}
    )
    second = k.api(
        "post",
        "/api/filters",
        {
            "group_id": 1,
            "filter_id": 7,
            "catalog": "ZTF_alerts",
            "permissions": [1, 2],
            "pipeline": [{"$match": {"candidate.drb": {"$gt": 0.9999}}}],
        },
    )
    assert second["data"]["fid"] != fid
    patched = k.api("patch", "/api/filters", {"filter_id": 7, "active_fid": fid})
    assert patched["data"]["active_fid"] == fid
    bad = k.api("patch", "/api/filters", {"filter_id": 7, "active_fid": "nope00"})
    assert bad["status"] == "error" and "not in filter.fv" in bad["message"]
    autosave = k.api(
        "patch",
        "/api/filters",
        {"filter_id": 7, "autosave": {"active": True, "comment": "saved", "pipeline": pipeline}},
    )
    assert isinstance(autosave["data"]["autosave"]["pipeline"], str)
    followup = k.api(
        "patch",
        "/api/filters",
        {
            "filter_id": 7,
            "auto_followup": {
                "active": True,
                "pipeline": pipeline,
                "allocation_id": 1,
                "payload": {"priority": 2},
                "priority_order": "desc",
            },
        },
    )
    assert followup["data"]["auto_followup"]["priority_order"] == "desc"
    clash = k.api(
        "post",
        "/api/filters",
        {
            "group_id": 2,
            "filter_id": 8,
            "catalog": "ZTF_alerts",
            "permissions": [1],
            "pipeline": pipeline,
            "autosave": True,
            "auto_followup": {
                "active": True,
                "pipeline": pipeline,
                "allocation_id": 1,
                "payload": {},
                "priority_order": "asc",
            },
        },
    )
    assert clash["status"] == "error" and "priority_order" in clash["message"]
    tested = k.api("post", "/api/filters/7/test", {"object_ids": ["ZTF20aajcbhr"]})
    assert tested["status"] == "success" and [d["objectId"] for d in tested["data"]] == [
        "ZTF20aajcbhr"
    ]
    window = k.api("post", "/api/filters/7/test", {"start_date": 2458881.0, "end_date": 2458882.0})
    assert window["status"] == "success" and len(window["data"]) >= 1
    too_long = k.api(
        "post", "/api/filters/7/test", {"start_date": 2458880.0, "end_date": 2458882.0}
    )
    assert too_long["status"] == "error"
    assert k.api("delete", "/api/filters/7")["message"] == "Removed filter id 7"
    assert k.api("delete", "/api/filters/7")["status"] == "error"


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ([{"$matc": {"candid": 1}}], "filter test run failed"),
        (
            [{"$lookup": {"from": "users", "localField": "a", "foreignField": "_id", "as": "u"}}],
            "forbidden stages",
        ),
        ([{"$match": {"$where": "sleep(100)"}}], "forbidden operators"),
        ([{"$merge": {"into": "x"}}], "forbidden stages"),
    ],
)
def test_filter_pipelines_refused(
    api: Api, users: dict[str, str], pipeline: list[Any], message: str
) -> None:
    r = api.call(
        "POST",
        "/api/filters",
        users["admin"],
        json={
            "group_id": 1,
            "filter_id": 9,
            "catalog": "ZTF_alerts",
            "permissions": [1],
            "pipeline": pipeline,
        },
    )
    assert r.status_code in (400, 403) and message in r.json()["message"]


# ------------------------------------------------------------------ permission matrix


def aux_programids(api: Api, token: str) -> set[int]:
    body = {
        "query_type": "find",
        "query": {
            "catalog": "ZTF_alerts_aux",
            "filter": {},
            "projection": {"prv_candidates.programid": 1},
        },
    }
    docs = loads(api.query(token, body))["data"]
    return {p["programid"] for d in docs for p in d["prv_candidates"]}


def alert_programids(api: Api, token: str) -> set[int]:
    body = {
        "query_type": "find",
        "query": {"catalog": "ZTF_alerts", "filter": {}, "projection": {"candidate.programid": 1}},
    }
    return {d["candidate"]["programid"] for d in loads(api.query(token, body))["data"]}


def test_programid_permissions_on_alerts_and_history(api: Api, users: dict[str, str]) -> None:
    assert alert_programids(api, users["public"]) == {1}
    assert alert_programids(api, users["partner"]) == {1}
    assert alert_programids(api, users["admin"]) == {1, 3}
    assert aux_programids(api, users["public"]) == {1}
    assert aux_programids(api, users["partner"]) == {1, 2}
    assert aux_programids(api, users["admin"]) == {1, 2, 3}
    # counts, aggregations and cone searches are restricted the same way
    count = {"query_type": "count_documents", "query": {"catalog": "ZTF_alerts", "filter": {}}}
    assert loads(api.query(users["public"], count))["data"] == 37
    assert loads(api.query(users["admin"], count))["data"] == 38
    est = {"query_type": "estimated_document_count", "query": {"catalog": "ZTF_alerts"}}
    assert loads(api.query(users["public"], est))["data"] == 37
    agg = {
        "query_type": "aggregate",
        "query": {
            "catalog": "ZTF_alerts_aux",
            "pipeline": [
                {"$unwind": "$prv_candidates"},
                {"$group": {"_id": "$prv_candidates.programid"}},
            ],
        },
    }
    assert {d["_id"] for d in loads(api.query(users["partner"], agg))["data"]} == {1, 2}
    hidden = {
        "query_type": "find_one",
        "query": {"catalog": "ZTF_alerts", "filter": {"candid": 472263571115115000}},
    }
    assert "data" not in loads(api.query(users["partner"], hidden))
    assert loads(api.query(users["admin"], hidden))["data"]["candidate"]["programid"] == 3
    r = api.call("GET", "/api/cutouts/ztf/472263571115115000/science/png", users["public"])
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("who", "method", "path", "body", "status", "message"),
    [
        (None, "GET", "/", None, 401, "authentication required"),
        (
            None,
            "POST",
            "/api/queries",
            {"query_type": "info", "query": {"command": "catalog_names"}},
            401,
            "authentication required",
        ),
        (
            None,
            "GET",
            "/api/classifications/ztf/1127561445515015011",
            None,
            401,
            "authentication required",
        ),
        (
            "public",
            "POST",
            "/api/users",
            {"username": "x", "password": "y"},
            403,
            "requires an admin",
        ),
        ("public", "GET", "/api/users", None, 403, "requires an admin"),
        (
            "public",
            "POST",
            "/api/filters",
            {
                "group_id": 1,
                "filter_id": 3,
                "catalog": "ZTF_alerts",
                "permissions": [1],
                "pipeline": [{"$match": {}}],
            },
            403,
            "requires an admin",
        ),
        (
            "public",
            "PUT",
            "/api/classifications/ztf",
            {"1127561445515015011": {"human_labels": ["Ia"]}},
            403,
            "requires an admin",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {"query_type": "drop", "query": {"catalog": "ZTF_alerts"}},
            403,
            "only admins may drop",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {"query_type": "find", "query": {"catalog": "users", "filter": {}}},
            403,
            "protected collection",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {
                "query_type": "cone_search",
                "query": {
                    "object_coordinates": {"cone_search_radius": 1, "radec": {"a": [1, 1]}},
                    "catalogs": {"filters": {}},
                },
            },
            403,
            "protected collection",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {
                "query_type": "find",
                "query": {"catalog": "ZTF_alerts", "filter": {"$where": "true"}},
            },
            403,
            "JavaScript",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {
                "query_type": "find",
                "query": {
                    "catalog": "ZTF_alerts",
                    "filter": {"$expr": {"$function": {"body": "x", "args": [], "lang": "js"}}},
                },
            },
            403,
            "JavaScript",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {
                "query_type": "aggregate",
                "query": {
                    "catalog": "ZTF_alerts",
                    "pipeline": [{"$group": {"_id": 1, "a": {"$accumulator": {}}}}],
                },
            },
            403,
            "JavaScript",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {
                "query_type": "aggregate",
                "query": {
                    "catalog": "ZTF_alerts",
                    "pipeline": [{"$match": {}}, {"$out": "stolen"}],
                },
            },
            403,
            "writes",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {
                "query_type": "aggregate",
                "query": {
                    "catalog": "ZTF_alerts",
                    "pipeline": [{"$facet": {"a": [{"$merge": {"into": "x"}}]}}],
                },
            },
            403,
            "writes",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {
                "query_type": "aggregate",
                "query": {
                    "catalog": "ZTF_alerts_aux",
                    "pipeline": [
                        {
                            "$lookup": {
                                "from": "users",
                                "localField": "_id",
                                "foreignField": "_id",
                                "as": "u",
                            }
                        }
                    ],
                },
            },
            403,
            "protected collection",
        ),
        (
            "public",
            "POST",
            "/api/queries",
            {
                "query_type": "aggregate",
                "query": {
                    "catalog": "ZTF_alerts_aux",
                    "pipeline": [
                        {
                            "$lookup": {
                                "from": "ZTF_alerts",
                                "localField": "_id",
                                "foreignField": "objectId",
                                "as": "a",
                            }
                        }
                    ],
                },
            },
            403,
            "every ZTF programid",
        ),
        ("partner", "DELETE", "/api/users/public", None, 403, "requires an admin"),
    ],
)
def test_permission_matrix_refusals(
    api: Api,
    users: dict[str, str],
    who: str | None,
    method: str,
    path: str,
    body: Any,
    status: int,
    message: str,
) -> None:
    r = api.call(method, path, users[who] if who else None, json=body)
    assert r.status_code == status, r.text
    answer = r.json()
    # 401s answer "Unauthorized" as upstream, the details are in "reason"
    assert answer["status"] == "error" and message in answer["message"] + answer.get("reason", "")


def test_admin_may_drop_and_read_users(api: Api, users: dict[str, str]) -> None:
    api.db.scratch.insert_one({"a": 1})
    r = api.query(users["admin"], {"query_type": "drop", "query": {"catalog": "scratch"}})
    assert r.status_code == 200 and r.json()["message"] == "Successfully dropped collection"
    assert "scratch" not in api.db.list_collection_names()
    listed = loads(api.call("GET", "/api/users", users["admin"]))["data"]
    assert {"admin", "public", "partner"} <= {u["_id"] for u in listed}
    assert all("password" not in u for u in listed)


# ------------------------------------------------------------------ errors keep their meaning


def test_auth_errors(api: Api) -> None:
    r = requests.post(f"{api.url}/api/auth", json={"username": "admin", "password": "wrong"})
    assert r.status_code == 401 and r.json()["message"] == "Unauthorized"
    assert r.json()["reason"] == "wrong username or password"
    r = requests.post(f"{api.url}/api/auth", json={"username": "admin"})
    assert r.status_code == 400 and r.json()["message"] == "missing password"
    r = requests.post(
        f"{api.url}/api/auth",
        json={"username": "admin", "password": "admin", "penquins.__version__": "0.1"},
    )
    assert r.status_code == 400 and "unsupported version of penquins" in r.json()["message"]
    r = requests.get(f"{api.url}/", headers={"Authorization": "no_token"})
    assert r.status_code == 401 and r.json()["message"] == "Unauthorized"
    assert r.json()["reason"] == "token is invalid"


def test_token_expiry_and_revocation(api: Api, users: dict[str, str]) -> None:
    secret = api.cfg.server.JWT_SECRET_KEY
    past = int(dt.datetime.now(dt.UTC).timestamp()) - 10
    admin_doc = api.db.users.find_one({"_id": "admin"})
    claims = {"user_id": "admin", "uid": admin_doc["uid"], "gen": admin_doc["token_generation"]}
    expired = jwt.encode({**claims, "iat": past - 100, "exp": past}, secret, algorithm="HS256")
    r = api.call("GET", "/", expired)
    assert r.status_code == 401 and r.json()["reason"].startswith("token has expired")
    # a password change revokes the tokens issued before it
    admin = users["admin"]
    assert (
        api.call(
            "POST", "/api/users", admin, json={"username": "temp", "password": "one"}
        ).status_code
        == 200
    )
    old = api.token("temp", "one")
    assert api.call("GET", "/", old).status_code == 200
    import time

    assert api.call("PUT", "/api/users/temp", admin, json={"password": "two"}).status_code == 200
    time.sleep(5.5)  # per-process user cache
    r = api.call("GET", "/", old)
    assert r.status_code == 401 and "revoked" in r.json()["reason"]
    assert api.call("GET", "/", api.token("temp", "two")).status_code == 200
    assert api.call("DELETE", "/api/users/temp", admin).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query_type": "nope", "query": {}}, "query_type must be one of"),
        ({"query_type": "find", "query": {"catalog": "ZTF_alerts"}}, "query.filter is required"),
        (
            {"query_type": "find", "query": {"catalog": "ZTF_alerts", "filter": "{not json"}},
            "query.filter: not valid JSON",
        ),
        (
            {
                "query_type": "find",
                "query": {"catalog": "ZTF_alerts", "filter": "__import__('os').system('true')"},
            },
            "not valid JSON",
        ),
        (
            {
                "query_type": "find",
                "query": {"catalog": "ZTF_alerts", "filter": {}},
                "kwargs": {"limit": -1},
            },
            "kwargs.limit",
        ),
        (
            {
                "query_type": "find",
                "query": {"catalog": "ZTF_alerts", "filter": {}},
                "kwargs": {"sort": [["a"]]},
            },
            "kwargs.sort",
        ),
        (
            {
                "query_type": "cone_search",
                "query": {
                    "object_coordinates": {
                        "cone_search_radius": 2,
                        "cone_search_unit": "parsec",
                        "radec": {"a": [1, 2]},
                    },
                    "catalogs": {"ZTF_alerts": {}},
                },
            },
            "unit must be one of",
        ),
        (
            {
                "query_type": "cone_search",
                "query": {
                    "object_coordinates": {"cone_search_radius": 2, "radec": {"a": [400, 2]}},
                    "catalogs": {"ZTF_alerts": {}},
                },
            },
            "radec.a: ra 400.0 out of range",
        ),
        (
            {"query_type": "find", "query": {"catalog": "ZTF_alerts", "filter": {"$bogus": 1}}},
            "database refused the operation",
        ),
        ({"query_type": "info", "query": {"command": "nope"}}, "query.command must be one of"),
    ],
)
def test_bad_queries_say_what_is_wrong(
    api: Api, users: dict[str, str], body: dict[str, Any], message: str
) -> None:
    r = api.query(users["public"], body)
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]


def test_request_size_limit(api: Api, users: dict[str, str]) -> None:
    big = {
        "query_type": "find",
        "query": {
            "catalog": "ZTF_alerts",
            "filter": {"x": "a" * (api.cfg.server.client_max_size + 10)},
        },
    }
    r = api.query(users["public"], big)
    assert r.status_code == 413 and r.json()["status"] == "error"


def test_large_results_stream_as_valid_json(api: Api, users: dict[str, str]) -> None:
    api.db.many.insert_many([{"i": i, "payload": "x" * 100} for i in range(1200)])
    body = {
        "query_type": "find",
        "query": {"catalog": "many", "filter": {}, "projection": {"_id": 0, "i": 1}},
    }
    r = api.query(users["public"], body)
    assert r.status_code == 200 and "Content-Length" not in r.headers
    data = loads(r)["data"]
    assert sorted(d["i"] for d in data) == list(range(1200))


# ------------------------------------------------------------------ cutouts, classifications, skymaps, docs


@pytest.mark.parametrize("cutout", ["science", "template", "difference"])
def test_cutouts_png_and_fits(api: Api, users: dict[str, str], cutout: str) -> None:
    png = api.call(
        "GET",
        f"/api/cutouts/ztf/1127561445515015011/{cutout}/png?cmap=viridis&interval=zscale",
        users["public"],
    )
    assert (
        png.status_code == 200
        and png.headers["Content-Type"] == "image/png"
        and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    )
    fits = api.call("GET", f"/api/cutouts/ztf/1127561445515015011/{cutout}/fits", users["public"])
    assert fits.status_code == 200 and fits.content[:6] == b"SIMPLE"
    assert (
        ".fits" in fits.headers["Content-Disposition"]
        and ".gz" not in fits.headers["Content-Disposition"]
    )
    bad = api.call(
        "GET", f"/api/cutouts/ztf/1127561445515015011/{cutout}/png?stretch=cubic", users["public"]
    )
    assert bad.status_code == 400 and "stretch must be one of" in bad.json()["message"]


def test_classifications(api: Api, users: dict[str, str]) -> None:
    admin = users["admin"]
    r = api.call(
        "PUT",
        "/api/classifications/ztf",
        admin,
        json={"1127561445515015011": {"human_labels": {"Ia": 0.8, "Ib": 0.1}}},
    )
    assert r.status_code == 200, r.text
    api.call(
        "PUT",
        "/api/classifications/ztf",
        admin,
        json={"1127561445515015011": {"human_labels": {"Ia": 0.2, "Ic": 0.7}}},
    )
    got = loads(api.call("GET", "/api/classifications/ztf/1127561445515015011", users["public"]))[
        "data"
    ]
    assert (
        got["human_labels"] == {"Ia": 0.2, "Ib": 0.1, "Ic": 0.7}
        and got["objectId"] == "ZTF20aajcbhr"
    )
    api.call(
        "DELETE",
        "/api/classifications/ztf",
        admin,
        json={"1127561445515015011": {"human_labels": ["Ia", "Ic"]}},
    )
    got = loads(api.call("GET", "/api/classifications/ztf/1127561445515015011", users["public"]))[
        "data"
    ]
    assert got["human_labels"] == {"Ib": 0.1}
    missing = api.call(
        "PUT", "/api/classifications/ztf", admin, json={"1": {"human_labels": ["Ia"]}}
    )
    assert missing.status_code == 404 and "candids not found" in missing.json()["message"]


def test_skymap_cone_put_query_delete(api: Api, users: dict[str, str]) -> None:
    token = users["admin"]  # skymap writes are admin-only
    alert = next(a for a in decoded_alerts() if a["candid"] == 1127107111615015007)  # ZTF19abzrhgq
    ra, dec = alert["candidate"]["ra"], alert["candidate"]["dec"]
    body = {
        "dateobs": "2020-02-02T12:00:00",
        "skymap": {"ra": ra, "dec": dec, "error": 0.5},
        "contours": [90],
    }
    r = api.call("PUT", "/api/skymap", token, json=body)
    assert r.status_code == 200, r.text
    name = r.json()["data"]["localization_name"]
    assert name == f"{ra:.5f}_{dec:.5f}_{0.5:.5f}"
    assert api.call("PUT", "/api/skymap", token, json={**body, "contours": [90, 95]}).json()[
        "data"
    ]["contours"] == [90, 95]
    again = api.call("PUT", "/api/skymap", token, json=body)
    assert again.status_code == 409 and again.json()["status"] == "already_exists"
    got = api.call(
        "GET", f"/api/skymap?dateobs=2020-02-02T12:00:00&localization_name={name}", token
    )
    assert got.status_code == 200 and "contour90" in got.json()["data"]["contours"]
    q: dict[str, Any] = {
        "query_type": "skymap",
        "query": {
            "skymap": {"localization_name": name, "dateobs": "2020-02-02T12:00:00", "contour": 90},
            "catalog": "ZTF_alerts",
            "filter": {},
            "projection": {"_id": 0, "objectId": 1},
        },
    }
    found = loads(api.query(token, q))["data"]
    assert {d["objectId"] for d in found} == {"ZTF19abzrhgq"}
    q["query"]["skymap"]["contour"] = 20
    r = api.query(token, q)
    assert r.status_code == 400 and "Contour level 20 not found in skymap" in r.json()["message"]
    assert (
        api.call(
            "DELETE",
            "/api/skymap",
            token,
            json={"dateobs": "2020-02-02T12:00:00", "localization_name": name},
        ).status_code
        == 200
    )
    gone = api.call(
        "GET", f"/api/skymap?dateobs=2020-02-02T12:00:00&localization_name={name}", token
    )
    assert gone.status_code == 200 and gone.json() == {
        "status": "error",
        "message": "no skymap found",
    }


def test_skymap_polygon_form(api: Api, users: dict[str, str]) -> None:
    token = users["admin"]  # skymap writes are admin-only
    # a small square around ZTF20aaelulu (185.7288484, 15.8236168)
    square = [[185.70, 15.80], [185.76, 15.80], [185.76, 15.85], [185.70, 15.85]]
    body = {
        "dateobs": "2020-01-01T00:00:00",
        "skymap": {"localization_name": "square", "polygon": square},
        "contours": [90],
    }
    assert api.call("PUT", "/api/skymap", token, json=body).status_code == 200
    q = {
        "query_type": "skymap",
        "query": {
            "skymap": {"localization_name": "square", "dateobs": "2020-01-01T00:00:00"},
            "catalog": "ZTF_alerts",
            "filter": {},
            "projection": {"_id": 0, "objectId": 1},
        },
    }
    assert {d["objectId"] for d in loads(api.query(token, q))["data"]} == {"ZTF20aaelulu"}
    bad = api.call(
        "PUT",
        "/api/skymap",
        token,
        json={**body, "skymap": {"localization_name": "x", "polygon": [[1, 2]]}},
    )
    assert bad.status_code == 400 and "polygon" in bad.json()["message"]


def test_docs_are_public(api: Api) -> None:
    page = requests.get(f"{api.url}/docs/api/")
    assert page.status_code == 200 and "redoc" in page.text
    spec = requests.get(f"{api.url}/docs/api/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/queries" in spec["paths"]


def test_alerts_files_present() -> None:
    assert len(list(ZTF_ALERTS.rglob("*.avro"))) == 38


def test_schemathesis_finds_no_server_errors(
    api: Api, users: dict[str, str], tmp_path: Any
) -> None:
    """Property-based run over every operation of the served OpenAPI spec: no 5xx, ever."""
    import shutil
    import subprocess
    import sys

    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is installed with the test requirements"
    report = tmp_path / "schemathesis.txt"
    result = subprocess.run(
        [
            cli,
            "run",
            f"{api.url}/docs/api/openapi.json",
            "--url",
            api.url,
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {users['admin']}",
            "--max-examples",
            "30",
            "--seed",
            "20261123",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    report.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-4000:]
