"""/api/skymap and skymap queries in-process: cone and polygon skymaps."""

from __future__ import annotations

from typing import Any

from .apiclient import AppApi, decoded_alerts, loads


async def test_skymap_cone_put_query_delete(api: AppApi, users: dict[str, str]) -> None:
    token = users["admin"]  # skymap writes are admin-only
    alert = next(a for a in decoded_alerts() if a["candid"] == 1127107111615015007)  # ZTF19abzrhgq
    ra, dec = alert["candidate"]["ra"], alert["candidate"]["dec"]
    body = {
        "dateobs": "2020-02-02T12:00:00",
        "skymap": {"ra": ra, "dec": dec, "error": 0.5},
        "contours": [90],
    }
    r = await api.call("PUT", "/api/skymap", token, json=body)
    assert r.status_code == 200, r.text
    name = r.json()["data"]["localization_name"]
    assert name == f"{ra:.5f}_{dec:.5f}_{0.5:.5f}"
    assert (
        await api.call("PUT", "/api/skymap", token, json={**body, "contours": [90, 95]})
    ).json()["data"]["contours"] == [90, 95]
    again = await api.call("PUT", "/api/skymap", token, json=body)
    assert again.status_code == 409 and again.json()["status"] == "already_exists"
    got = await api.call(
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
    found = loads(await api.query(token, q))["data"]
    assert {d["objectId"] for d in found} == {"ZTF19abzrhgq"}
    q["query"]["skymap"]["contour"] = 20
    r = await api.query(token, q)
    assert r.status_code == 400 and "Contour level 20 not found in skymap" in r.json()["message"]
    assert (
        await api.call(
            "DELETE",
            "/api/skymap",
            token,
            json={"dateobs": "2020-02-02T12:00:00", "localization_name": name},
        )
    ).status_code == 200
    gone = await api.call(
        "GET", f"/api/skymap?dateobs=2020-02-02T12:00:00&localization_name={name}", token
    )
    assert gone.status_code == 200 and gone.json() == {
        "status": "error",
        "message": "no skymap found",
    }


async def test_skymap_polygon_form(api: AppApi, users: dict[str, str]) -> None:
    token = users["admin"]  # skymap writes are admin-only
    # a small square around ZTF20aaelulu (185.7288484, 15.8236168)
    square = [[185.70, 15.80], [185.76, 15.80], [185.76, 15.85], [185.70, 15.85]]
    body = {
        "dateobs": "2020-01-01T00:00:00",
        "skymap": {"localization_name": "square", "polygon": square},
        "contours": [90],
    }
    assert (await api.call("PUT", "/api/skymap", token, json=body)).status_code == 200
    q = {
        "query_type": "skymap",
        "query": {
            "skymap": {"localization_name": "square", "dateobs": "2020-01-01T00:00:00"},
            "catalog": "ZTF_alerts",
            "filter": {},
            "projection": {"_id": 0, "objectId": 1},
        },
    }
    assert {d["objectId"] for d in loads(await api.query(token, q))["data"]} == {"ZTF20aaelulu"}
    bad = await api.call(
        "PUT",
        "/api/skymap",
        token,
        json={**body, "skymap": {"localization_name": "x", "polygon": [[1, 2]]}},
    )
    assert bad.status_code == 400 and "polygon" in bad.json()["message"]
