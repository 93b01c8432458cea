"""Skymaps from the real S230623ai VOEvent and its multi-order FITS localization (data/skymaps/):
PUT as a VOEvent, as uniq/probdensity arrays and by URL; GET, the `skymap` query and DELETE.

Nothing reaches the network: the FITS file is served by an aiohttp server started in this test
module, and the tests rewrite the GraceDB URL in their in-memory copy of the VOEvent to point at it
(the file name stays `cwb.multiorder.fits,1`, which upstream uses as the localization name).
The expected alerts are computed here independently of the server: each alert's HEALPix cell and
the greedy credible level of that cell (cells by decreasing density, cumulative probability).
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from aiohttp import web
from astropy import units
from astropy.io import fits
from cdshealpix import nested

from kowalski.config import ROOT

from .apiclient import Api, decoded_alerts, gunicorn_users, loads, served_api

users = gunicorn_users  # the module's user tokens (fixture)
# the in-test file server listens on 127.0.0.1, which sky map URLs may not point to by default
LOOPBACK_ALLOWED = {"KOWALSKI__server__skymap_fetch_allow": "[127.0.0.0/8]"}


@pytest.fixture(scope="module")
def api(
    test_environ: dict[str, str], mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """The module's API server (gunicorn), allowed to fetch sky maps from this machine."""
    yield from served_api({**test_environ, **LOOPBACK_ALLOWED}, mongo_uri, tmp_path_factory)


SKYMAPS = ROOT / "data" / "skymaps"
GRACEDB_URL = "https://gracedb.ligo.org/api/superevents/S230623ai/files/cwb.multiorder.fits,1"
FITS_PATH = "/api/superevents/S230623ai/files/cwb.multiorder.fits,1"
DATEOBS = "2023-06-23T15:42:26"


@dataclass
class FileServer:
    url: str

    def voevent(self) -> str:
        """The real VOEvent with its sky map URL pointed at this server."""
        text = (SKYMAPS / "voevent.xml").read_text()
        assert GRACEDB_URL in text
        return text.replace(GRACEDB_URL, self.url + FITS_PATH)


def flat_healpix_fits() -> bytes:
    """A valid FITS file that is not a multi-order map: a flat order-0 map (PROB, NESTED)."""
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="PROB", format="D", array=[1 / 12] * 12)]
    )
    table.header["ORDERING"] = "NESTED"
    out = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    """An in-test HTTP server on a free port: the real FITS map, a flat map, junk and a 500."""
    localization = (SKYMAPS / "localization.fits").read_bytes()
    routes = {
        FITS_PATH: localization,
        "/files/localization.fits": localization,
        "/files/flat.fits": flat_healpix_fits(),
        "/files/junk.fits": b"this is not a FITS file" * 100,
    }

    async def serve(request: web.Request) -> web.Response:
        if request.path in routes:
            return web.Response(body=routes[request.path])
        return web.Response(status=500, text="GraceDB is down")

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield FileServer(f"http://127.0.0.1:{port}")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def fits_map() -> tuple[np.ndarray, np.ndarray]:
    with fits.open(SKYMAPS / "localization.fits") as hdus:
        table = hdus[1].data
        return np.asarray(table["UNIQ"], dtype=np.int64), np.asarray(table["PROBDENSITY"])


def expected_objects(uniq: np.ndarray, density: np.ndarray, level: float) -> set[str]:
    """Objects whose alerts lie in the greedy `level`% credible region of an order-6 map."""
    assert np.all((uniq >= 4 * 4**6) & (uniq < 16 * 4**6)), "the bundled map is all order 6"
    probability = density / density.sum()
    ranked = np.argsort(-density, kind="stable")
    inside = set(uniq[ranked][np.cumsum(probability[ranked]) <= level / 100].tolist())
    alerts = decoded_alerts()
    ra = np.array([a["candidate"]["ra"] for a in alerts])
    dec = np.array([a["candidate"]["dec"] for a in alerts])
    cells = nested.lonlat_to_healpix(ra * units.deg, dec * units.deg, 6).astype(np.int64) + 4 * 4**6
    return {a["objectId"] for a, cell in zip(alerts, cells, strict=True) if int(cell) in inside}


def skymap_query(name: str, contour: int, **identity: Any) -> dict[str, Any]:
    return {
        "query_type": "skymap",
        "query": {
            "skymap": {"localization_name": name, "contour": contour, **identity},
            "catalog": "ZTF_alerts",
            "filter": {},
            "projection": {"_id": 0, "objectId": 1},
        },
    }


def found_objects(api: Api, token: str, query: dict[str, Any]) -> set[str]:
    r = api.query(token, query)
    assert r.status_code == 200, r.text
    return {d["objectId"] for d in loads(r)["data"]}


def skymap_count(api: Api) -> int:
    count: int = api.db[api.cfg.database.collections["skymaps"]].count_documents({})
    return count


def test_voevent_put_get_query_delete(api: Api, users: dict[str, str], files: FileServer) -> None:
    admin = users["admin"]
    r = api.call(
        "PUT", "/api/skymap", admin, json={"voevent": files.voevent(), "contours": [50, 90]}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "success",
        "message": "added skymap for 2023-06-23 15:42:26 with contours [50, 90]",
        "data": {
            "dateobs": DATEOBS,
            "localization_name": "cwb.multiorder.fits,1",
            "contours": [50, 90],
        },
    }
    got = api.call("GET", f"/api/skymap?dateobs={DATEOBS}", users["public"])
    assert got.status_code == 200 and got.json()["status"] == "success"
    doc = got.json()["data"]
    assert doc["dateobs"] == DATEOBS and doc["aliases"] == ["LVC#S230623ai"]
    assert doc["localization_name"] == "cwb.multiorder.fits,1" and "triggerid" not in doc
    assert {"center", "contour50", "contour90"} <= set(doc["contours"])
    assert doc["contours"]["contour90"]["type"] == "MultiPolygon"
    by_alias = api.call("GET", f"/api/skymap?alias={quote('LVC#S230623ai')}", users["public"])
    assert by_alias.json()["data"]["localization_name"] == "cwb.multiorder.fits,1"
    missing_level = api.call("GET", f"/api/skymap?dateobs={DATEOBS}&contours=95", admin)
    assert missing_level.status_code == 200 and missing_level.json() == {
        "status": "error",
        "message": "skymap exists but is missing contours [95]",
    }

    uniq, density = fits_map()
    for level in (50, 90):
        expected = expected_objects(uniq, density, level)
        query = skymap_query("cwb.multiorder.fits,1", level, dateobs=DATEOBS)
        assert found_objects(api, admin, query) == expected
    assert expected and len(expected) < len({a["objectId"] for a in decoded_alerts()})
    by_alias_query = skymap_query("cwb.multiorder.fits,1", 90, aliases=["LVC#S230623ai"])
    assert found_objects(api, admin, by_alias_query) == expected

    again = api.call("PUT", "/api/skymap", admin, json={"voevent": files.voevent(), "contours": 90})
    assert again.status_code == 409 and again.json() == {
        "status": "already_exists",
        "message": "skymap already exists with the same contours",
        "data": {
            "dateobs": DATEOBS,
            "localization_name": "cwb.multiorder.fits,1",
            "contours": [50, 90],
        },
    }
    more = api.call("PUT", "/api/skymap", admin, json={"voevent": files.voevent(), "contours": 95})
    assert more.status_code == 200 and more.json()["data"]["contours"] == [50, 90, 95]

    body = {"dateobs": DATEOBS, "localization_name": "cwb.multiorder.fits,1"}
    assert api.call("DELETE", "/api/skymap", users["public"], json=body).status_code == 403
    deleted = api.call("DELETE", "/api/skymap", admin, json=body)
    assert deleted.status_code == 200 and deleted.json()["message"] == "deleted 1 skymap"
    for method, kwargs in (("GET", {}), ("DELETE", {"json": body})):
        path = f"/api/skymap?dateobs={DATEOBS}" if method == "GET" else "/api/skymap"
        gone = api.call(method, path, admin, **kwargs)
        assert gone.status_code == 200
        assert gone.json() == {"status": "error", "message": "no skymap found"}


def test_multiorder_map_as_arrays_and_by_url(
    api: Api, users: dict[str, str], files: FileServer
) -> None:
    admin = users["admin"]
    uniq, density = fits_map()
    density = np.array([float(f"{d:.6g}") for d in density])  # keeps the body under 1 MiB
    arrays = {
        "dateobs": "2023-06-24T00:00:00.000",  # each test its own event: tests run in any order
        "contours": [90],
        "skymap": {
            "localization_name": "S230623ai-arrays",
            "uniq": uniq.tolist(),
            "probdensity": density.tolist(),
        },
    }
    r = api.call("PUT", "/api/skymap", admin, json=arrays)
    assert r.status_code == 200, r.text
    query = skymap_query("S230623ai-arrays", 90, dateobs="2023-06-24T00:00:00")
    assert found_objects(api, admin, query) == expected_objects(uniq, density, 90)

    by_url = {
        "dateobs": "2023-06-25T00:00:00",
        "aliases": ["S230623ai"],
        "contours": "50,90",
        "skymap": {"url": files.url + "/files/localization.fits"},
    }
    r = api.call("PUT", "/api/skymap", admin, json=by_url)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {
        "dateobs": "2023-06-25T00:00:00",
        "localization_name": "localization.fits",
        "contours": [50, 90],
    }
    uniq, density = fits_map()
    query = skymap_query("localization.fits", 50, aliases="S230623ai")
    assert found_objects(api, users["admin"], query) == expected_objects(uniq, density, 50)


XXE = """<?xml version="1.0"?>
<!DOCTYPE VOEvent [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<voe:VOEvent xmlns:voe="http://www.ivoa.net/xml/VOEvent/v2.0" version="2.0" role="test"
 ivorn="ivo://x/y#z"><Who><Date>&secret;</Date></Who></voe:VOEvent>"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"voevent": "not xml at all"}, "xml file is not valid VOEvent"),
        ({"voevent": "<VOEvent><What/></VOEvent>"}, "xml file is not valid VOEvent"),
        ({"voevent": XXE}, "xml file is not valid VOEvent"),
        ({"voevent": "BROKEN_URL"}, "could not fetch skymap"),
        ({"voevent": "UNREACHABLE_URL"}, "could not fetch skymap"),
        (
            {"dateobs": DATEOBS, "skymap": {"url": "/files/flat.fits"}},
            "not a multi-order sky map",
        ),
        ({"dateobs": DATEOBS, "skymap": {"url": "/files/junk.fits"}}, "not a readable FITS"),
        ({"dateobs": DATEOBS, "skymap": {"url": "file:///etc/passwd"}}, "http(s) URL"),
        (
            {
                "dateobs": DATEOBS,
                "skymap": {"localization_name": "x", "uniq": [4, 16], "probdensity": [1, 1]},
            },
            "overlapping",
        ),
        (
            {
                "dateobs": DATEOBS,
                "skymap": {"localization_name": "x", "uniq": [4, 5], "probdensity": [1, -1]},
            },
            "probdensity must be finite and >= 0",
        ),
        (
            {
                "dateobs": DATEOBS,
                "skymap": {"localization_name": "x", "uniq": [1], "probdensity": [1]},
            },
            "not NUNIQ cells",
        ),
        ({"dateobs": DATEOBS, "aliases": 5, "skymap": {"ra": 1, "dec": 2, "error": 1}}, "aliases"),
        (
            {
                "dateobs": DATEOBS,
                "triggerid": {"$ne": 0},
                "skymap": {"ra": 1, "dec": 2, "error": 1},
            },
            "triggerid",
        ),
    ],
)
def test_bad_skymaps_are_a_clear_400_and_store_nothing(
    api: Api, users: dict[str, str], files: FileServer, body: dict[str, Any], message: str
) -> None:
    if body.get("voevent") == "BROKEN_URL":
        body = {"voevent": files.voevent().replace(FITS_PATH, "/missing/cwb.multiorder.fits")}
    elif body.get("voevent") == "UNREACHABLE_URL":
        body = {"voevent": files.voevent().replace(files.url, "http://127.0.0.1:9")}
    elif isinstance(body.get("skymap"), dict) and str(body["skymap"].get("url", "")).startswith(
        "/"
    ):
        body = {**body, "skymap": {"url": files.url + body["skymap"]["url"]}}
    before = skymap_count(api)
    r = api.call("PUT", "/api/skymap", users["admin"], json=body)
    assert r.status_code == 400, r.text
    assert r.json()["status"] == "error" and message in r.json()["message"]
    assert skymap_count(api) == before


def test_skymap_writes_are_admin_only_and_identifiers_plain(
    api: Api, users: dict[str, str]
) -> None:
    cone = {"dateobs": "2021-05-05T00:00:00", "skymap": {"ra": 10, "dec": 20, "error": 1}}
    for who in ("public", "partner"):
        r = api.call("PUT", "/api/skymap", users[who], json=cone)
        assert r.status_code == 403
    assert api.call("PUT", "/api/skymap", users["admin"], json=cone).status_code == 200
    name = "10.00000_20.00000_1.00000"
    operator = {"$ne": None}
    for field, value in (
        ("localization_name", operator),
        ("aliases", operator),
        ("trigger_id", operator),
        ("dateobs", operator),
    ):
        spec = {"localization_name": name, "dateobs": "2021-05-05T00:00:00", field: value}
        query = skymap_query(name, 90)
        query["query"]["skymap"] = spec
        r = api.query(users["public"], query)
        assert r.status_code == 400, (field, r.text)
    delete = {"dateobs": "2021-05-05T00:00:00", "localization_name": operator}
    assert api.call("DELETE", "/api/skymap", users["admin"], json=delete).status_code == 400
    r = api.call(
        "DELETE", "/api/skymap", users["admin"], json={**delete, "localization_name": name}
    )
    assert r.status_code == 200 and r.json()["status"] == "success"
