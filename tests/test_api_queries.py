"""POST /api/queries in-process: paging, errors that say what is wrong, limits, streaming."""

from __future__ import annotations

from typing import Any

import pytest

from .apiclient import AppApi, decoded_alerts, loads


async def test_sort_as_mapping_skip_and_hint(api: AppApi, users: dict[str, str]) -> None:
    body = {
        "query_type": "find",
        "query": {"catalog": "ZTF_alerts", "filter": {}, "projection": {"_id": 0, "candid": 1}},
        "kwargs": {"sort": {"candid": 1}, "skip": 2, "limit": 3, "hint": "candid"},
    }
    data = loads(await api.query(users["admin"], body))["data"]
    all_candids = sorted(a["candid"] for a in decoded_alerts())
    assert [d["candid"] for d in data] == all_candids[2:5]


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
async def test_bad_queries_say_what_is_wrong(
    api: AppApi, users: dict[str, str], body: dict[str, Any], message: str
) -> None:
    r = await api.query(users["public"], body)
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]


async def test_request_size_limit(api: AppApi, users: dict[str, str]) -> None:
    big = {
        "query_type": "find",
        "query": {
            "catalog": "ZTF_alerts",
            "filter": {"x": "a" * (api.cfg.server.client_max_size + 10)},
        },
    }
    r = await api.query(users["public"], big)
    assert r.status_code == 413 and r.json()["status"] == "error"


async def test_large_results_stream_as_valid_json(api: AppApi, users: dict[str, str]) -> None:
    api.db.many.insert_many([{"i": i, "payload": "x" * 100} for i in range(1200)])
    body = {
        "query_type": "find",
        "query": {"catalog": "many", "filter": {}, "projection": {"_id": 0, "i": 1}},
    }
    r = await api.query(users["public"], body)
    assert r.status_code == 200 and "Content-Length" not in r.headers
    data = loads(r)["data"]
    assert sorted(d["i"] for d in data) == list(range(1200))
