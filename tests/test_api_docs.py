"""The OpenAPI document in-process: generated from the route table and the request models."""

from __future__ import annotations

import json

from api.models import QUERY_TYPE_NAMES

from .apiclient import AppApi


async def test_every_route_is_documented_with_its_request_body(api: AppApi) -> None:
    page = await api.call("GET", "/docs/api")
    assert page.status_code == 200 and "redoc" in page.text
    spec = (await api.call("GET", "/docs/api/openapi.json")).json()
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in api.client.app.router.routes()
        if route.resource and route.method != "HEAD"
        if not route.resource.canonical.startswith("/docs/api")
    }
    documented = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert documented == routes
    queries = spec["paths"]["/api/queries"]["post"]["requestBody"]["content"]["application/json"]
    kinds = [alt["properties"]["query_type"]["enum"][0] for alt in queries["schema"]["oneOf"]]
    assert kinds == list(QUERY_TYPE_NAMES)
    auth = spec["paths"]["/api/auth"]["post"]
    assert (
        auth["security"] == []
        and "username"
        in (auth["requestBody"]["content"]["application/json"]["schema"]["properties"])
    )
    assert '"null"' not in json.dumps(spec)  # OpenAPI 3.0 has `nullable`, no null type
