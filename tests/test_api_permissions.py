"""Data rights in-process: programid permissions in every query type, the refusal matrix, admin-only actions."""

from __future__ import annotations

from typing import Any

import pytest

from .apiclient import AppApi, loads


async def aux_programids(api: AppApi, token: str) -> set[int]:
    body = {
        "query_type": "find",
        "query": {
            "catalog": "ZTF_alerts_aux",
            "filter": {},
            "projection": {"prv_candidates.programid": 1},
        },
    }
    docs = loads(await api.query(token, body))["data"]
    return {p["programid"] for d in docs for p in d["prv_candidates"]}


async def alert_programids(api: AppApi, token: str) -> set[int]:
    body = {
        "query_type": "find",
        "query": {"catalog": "ZTF_alerts", "filter": {}, "projection": {"candidate.programid": 1}},
    }
    return {d["candidate"]["programid"] for d in loads(await api.query(token, body))["data"]}


async def test_programid_permissions_on_alerts_and_history(
    api: AppApi, users: dict[str, str]
) -> None:
    assert await alert_programids(api, users["public"]) == {1}
    assert await alert_programids(api, users["partner"]) == {1}
    assert await alert_programids(api, users["admin"]) == {1, 3}
    assert await aux_programids(api, users["public"]) == {1}
    assert await aux_programids(api, users["partner"]) == {1, 2}
    assert await aux_programids(api, users["admin"]) == {1, 2, 3}
    # counts, aggregations and cone searches are restricted the same way
    count = {"query_type": "count_documents", "query": {"catalog": "ZTF_alerts", "filter": {}}}
    assert loads(await api.query(users["public"], count))["data"] == 37
    assert loads(await api.query(users["admin"], count))["data"] == 38
    est = {"query_type": "estimated_document_count", "query": {"catalog": "ZTF_alerts"}}
    assert loads(await api.query(users["public"], est))["data"] == 37
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
    assert {d["_id"] for d in loads(await api.query(users["partner"], agg))["data"]} == {1, 2}
    hidden = {
        "query_type": "find_one",
        "query": {"catalog": "ZTF_alerts", "filter": {"candid": 472263571115115000}},
    }
    assert "data" not in loads(await api.query(users["partner"], hidden))
    assert loads(await api.query(users["admin"], hidden))["data"]["candidate"]["programid"] == 3
    r = await api.call("GET", "/api/cutouts/ztf/472263571115115000/science/png", users["public"])
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
async def test_permission_matrix_refusals(
    api: AppApi,
    users: dict[str, str],
    who: str | None,
    method: str,
    path: str,
    body: Any,
    status: int,
    message: str,
) -> None:
    r = await api.call(method, path, users[who] if who else None, json=body)
    assert r.status_code == status, r.text
    answer = r.json()
    # 401s answer "Unauthorized" as upstream, the details are in "reason"
    assert answer["status"] == "error" and message in answer["message"] + answer.get("reason", "")


async def test_admin_may_drop_and_read_users(api: AppApi, users: dict[str, str]) -> None:
    api.db.scratch.insert_one({"a": 1})
    r = await api.query(users["admin"], {"query_type": "drop", "query": {"catalog": "scratch"}})
    assert r.status_code == 200 and r.json()["message"] == "Successfully dropped collection"
    assert "scratch" not in api.db.list_collection_names()
    listed = loads(await api.call("GET", "/api/users", users["admin"]))["data"]
    assert {"admin", "public", "partner"} <= {u["_id"] for u in listed}
    assert all("password" not in u for u in listed)
