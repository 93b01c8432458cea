"""Answers real clients match on, as upstream Kowalski gives them (status code, `status`, `message`
text, response shape); written from the behaviour documented for upstream, run against this API."""

from __future__ import annotations

from typing import Any

import requests

from .apiclient import Api, gunicorn_api, gunicorn_users

api = gunicorn_api  # the module's API server and user tokens (fixtures)
users = gunicorn_users

PIPELINE = [{"$match": {"candidate.drb": {"$gt": 0.5}}}, {"$project": {"_id": 0, "objectId": 1}}]
CLASH = (
    "Cannot add new filter with auto_followup: existing filters with the same allocation have "
    "priority_order set to a different value, which is unexpected"
)


def followup(order: str, allocation_id: int = 42) -> dict[str, Any]:
    return {
        "active": True,
        "pipeline": PIPELINE,
        "allocation_id": allocation_id,
        "payload": {"priority": 1},
        "priority_order": order,
    }


def new_filter(filter_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "group_id": 1,
        "filter_id": filter_id,
        "catalog": "ZTF_alerts",
        "permissions": [1, 2],
        "pipeline": PIPELINE,
        **extra,
    }


def error(r: requests.Response, status: int, message: str) -> None:
    assert r.status_code == status, r.text
    assert r.json() == {"status": "error", "message": message}


def test_priority_order_clash_is_refused_including_the_filter_itself(
    api: Api, users: dict[str, str]
) -> None:
    admin = users["admin"]
    first = new_filter(31, autosave=True, auto_followup=followup("desc"))
    assert api.call("POST", "/api/filters", admin, json=first).status_code == 200
    # another filter of the same allocation
    other = new_filter(32, autosave=True, auto_followup=followup("asc"))
    error(api.call("POST", "/api/filters", admin, json=other), 400, CLASH)
    # a new version of the filter itself, and a PATCH of the filter itself
    again = {**first, "auto_followup": followup("asc")}
    error(api.call("POST", "/api/filters", admin, json=again), 400, CLASH)
    patch = {"filter_id": 31, "auto_followup": followup("asc")}
    error(api.call("PATCH", "/api/filters", admin, json=patch), 400, CLASH)
    # the same order, or another allocation, is fine
    same = api.call(
        "POST", "/api/filters", admin, json={**other, "auto_followup": followup("desc")}
    )
    assert same.status_code == 200, same.text
    elsewhere = {"filter_id": 32, "auto_followup": followup("asc", allocation_id=43)}
    assert api.call("PATCH", "/api/filters", admin, json=elsewhere).status_code == 200
    for filter_id in (31, 32):
        assert api.call("DELETE", f"/api/filters/{filter_id}", admin).status_code == 200


def test_missing_filter_is_400(api: Api, users: dict[str, str]) -> None:
    admin = users["admin"]
    message = "Filter id 999 not found"
    error(api.call("GET", "/api/filters/999", admin), 400, message)
    error(api.call("DELETE", "/api/filters/999", admin), 400, message)
    patch = {"filter_id": 999, "active": False}
    error(api.call("PATCH", "/api/filters", admin, json=patch), 400, message)
    test = {"object_ids": ["ZTF20aajcbhr"]}
    error(api.call("POST", "/api/filters/999/test", admin, json=test), 400, message)


def test_filter_messages_clients_match_on(api: Api, users: dict[str, str]) -> None:
    admin = users["admin"]
    assert api.call("POST", "/api/filters", admin, json=new_filter(33)).status_code == 200
    error(
        api.call("PATCH", "/api/filters", admin, json={"filter_id": 33, "active_fid": "zzz999"}),
        400,
        "ValueError: Cannot set active_fid to zzz999: filter version fid not in filter.fv",
    )
    error(
        api.call(
            "POST",
            "/api/filters/33/test",
            admin,
            json={"start_date": "2020-02-01T00:00:00", "end_date": "2020-02-03T00:00:00"},
        ),
        400,
        "start_date and end_date must be within 1 day of each other if object_ids is not provided",
    )
    error(
        api.call(
            "POST",
            "/api/filters/33/test",
            admin,
            json={"object_ids": ["ZTF20aajcbhr"], "max_time_ms": 300_001},
        ),
        400,
        "max_time_ms must be less than 5 minutes (in ms: 300000)",
    )
    ok = api.call(
        "POST",
        "/api/filters/33/test",
        admin,
        json={"object_ids": ["ZTF20aajcbhr"], "max_time_ms": 300_000},
    )
    assert ok.status_code == 200 and ok.json()["message"] == "filter test successful"
    assert api.call("DELETE", "/api/filters/33", admin).json()["message"] == "Removed filter id 33"


def test_dates_in_responses_have_upstreams_shape(api: Api, users: dict[str, str]) -> None:
    """Filters come back as upstream's `bson.json_util.dumps` writes them (`{"$date": ISO}`);
    skymaps carry `dateobs` as a plain ISO string (upstream formats it with `isoformat()`)."""
    admin = users["admin"]
    created = api.call("POST", "/api/filters", admin, json=new_filter(34)).json()
    assert set(created["data"]["created_at"]) == {"$date"}
    got = api.call("GET", "/api/filters/34", admin).json()["data"]
    for value in (got["created_at"], got["last_modified"], got["fv"][0]["created_at"]):
        assert set(value) == {"$date"} and value["$date"].endswith("Z")
    api.call("DELETE", "/api/filters/34", admin)

    cone = {"dateobs": "2023-06-23T15:42:26", "skymap": {"ra": 1, "dec": 2, "error": 1}}
    put = api.call("PUT", "/api/skymap", admin, json={**cone, "contours": [90]})
    assert put.json()["data"]["dateobs"] == "2023-06-23T15:42:26"
    conflict = api.call("PUT", "/api/skymap", admin, json={**cone, "contours": [90]})
    assert (
        conflict.status_code == 409 and conflict.json()["data"]["dateobs"] == "2023-06-23T15:42:26"
    )
    got = api.call("GET", "/api/skymap?dateobs=2023-06-23T15:42:26", users["public"]).json()
    assert got["status"] == "success" and got["data"]["dateobs"] == "2023-06-23T15:42:26"
