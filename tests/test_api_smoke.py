"""The API as deployed: gunicorn with two workers, called by penquins (as SkyPortal and users do),
the docs, and schemathesis over the served OpenAPI document."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
import requests
from penquins import Kowalski

from kowalski.coords import great_circle_distance

from .apiclient import Api, decoded_alerts, gunicorn_api, gunicorn_users
from .conftest import ZTF_ALERTS

api = gunicorn_api  # a gunicorn server of this module's own (fixtures)
users = gunicorn_users


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


def test_docs_are_public(api: Api) -> None:
    page = requests.get(f"{api.url}/docs/api/")
    assert page.status_code == 200 and "redoc" in page.text
    spec = requests.get(f"{api.url}/docs/api/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/queries" in spec["paths"]


def test_alerts_files_present() -> None:
    assert len(list(ZTF_ALERTS.rglob("*.avro"))) == 38


@pytest.mark.timeout(900)  # every operation, on a machine shared with other work
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
