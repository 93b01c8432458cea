"""OpenAPI 3 description of the API, served at /docs/api/openapi.json with a ReDoc page at /docs/api."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kowalski.config import Config
from kowalski.surveys import SURVEYS

QUERY_TYPES = [
    "find",
    "find_one",
    "count_documents",
    "estimated_document_count",
    "aggregate",
    "info",
    "cone_search",
    "near",
    "skymap",
    "drop",
]


def _ok(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Success"}}},
    }


ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
}


def _op(
    summary: str, body: dict[str, Any] | None = None, public: bool = False, **extra: Any
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": _ok(summary), **ERRORS}, **extra}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def spec(cfg: Config) -> dict[str, Any]:
    obj = {"type": "object"}
    filter_id = _path_param("filter_id", {"type": "integer", "minimum": 1})
    return {
        "openapi": "3.0.3",
        "info": {
            "title": cfg.server.name,
            "version": cfg.server.version,
            "description": cfg.server.description,
            "contact": {"name": cfg.server.contact.name, "email": cfg.server.contact.email},
        },
        "security": [{"bearerAuth": []}],
        "paths": {
            "/": {"get": _op("Ping")},
            "/api/auth": {
                "post": _op(
                    "Get a token",
                    {
                        "type": "object",
                        "required": ["username", "password"],
                        "properties": {
                            "username": {"type": "string"},
                            "password": {"type": "string"},
                        },
                    },
                    public=True,
                )
            },
            "/api/users": {
                "get": _op("List users (admin)"),
                "post": _op(
                    "Add a user (admin)",
                    {
                        "type": "object",
                        "required": ["username", "password"],
                        "properties": {
                            "username": {"type": "string"},
                            "password": {"type": "string"},
                            "email": {"type": "string"},
                            "admin": {"type": "boolean"},
                            "permissions": {
                                "type": "object",
                                "description": 'programids per survey, e.g. {"ZTF": [1, 2]}',
                                "additionalProperties": {
                                    "type": "array",
                                    "items": {"type": "integer"},
                                },
                            },
                        },
                    },
                ),
            },
            "/api/users/{username}": {
                "parameters": [_path_param("username", {"type": "string"})],
                "put": _op("Edit a user (admin)", obj),
                "delete": _op("Remove a user (admin)"),
            },
            "/api/users/{username}/revoke": {
                "parameters": [_path_param("username", {"type": "string"})],
                "post": _op("Revoke every token issued to a user so far (admin)"),
            },
            "/api/queries": {
                "post": _op(
                    "Run a query",
                    {
                        "type": "object",
                        "required": ["query_type", "query"],
                        "properties": {
                            "query_type": {"type": "string", "enum": QUERY_TYPES},
                            "query": obj,
                            "kwargs": {
                                "type": "object",
                                "properties": {
                                    "limit": {"type": "integer"},
                                    "skip": {"type": "integer"},
                                    "sort": {},
                                    "hint": {},
                                    "max_time_ms": {"type": "integer"},
                                    "filter_first": {"type": "boolean"},
                                    "allowDiskUse": {"type": "boolean"},
                                },
                            },
                        },
                    },
                )
            },
            "/api/filters": {
                "post": _op(
                    "Create a filter or a new version (admin)",
                    {
                        "type": "object",
                        "required": ["group_id", "filter_id", "catalog", "permissions", "pipeline"],
                        "properties": {
                            "group_id": {"type": "integer"},
                            "filter_id": {"type": "integer"},
                            "catalog": {"type": "string"},
                            "permissions": {"type": "array", "items": {"type": "integer"}},
                            "pipeline": {"type": "array", "items": obj},
                            "autosave": {},
                            "auto_followup": obj,
                            "update_annotations": {"type": "boolean"},
                        },
                    },
                ),
                "patch": _op(
                    "Modify a filter (admin)",
                    {
                        "type": "object",
                        "required": ["filter_id"],
                        "properties": {"filter_id": {"type": "integer"}},
                    },
                ),
            },
            "/api/filters/{filter_id}": {
                "parameters": [filter_id],
                "get": _op("Get a filter (admin)"),
                "delete": _op("Delete a filter (admin)"),
            },
            "/api/filters/{filter_id}/test": {
                "parameters": [filter_id],
                "post": _op("Run a filter over archived alerts (admin)", obj),
            },
            "/api/cutouts/{survey}/{candid}/{cutout}/{file_format}": {
                "parameters": [
                    _path_param(
                        "survey", {"type": "string", "enum": [s.key for s in SURVEYS.values()]}
                    ),
                    # the detection id: candid (ZTF, ...), diaSourceId (LSST)
                    _path_param("candid", {"type": "integer", "minimum": 0}),
                    _path_param(
                        "cutout", {"type": "string", "enum": ["science", "template", "difference"]}
                    ),
                    _path_param("file_format", {"type": "string", "enum": ["fits", "png"]}),
                ],
                "get": {
                    "summary": "Alert cutout as FITS or PNG",
                    "responses": {
                        "200": {
                            "description": "image",
                            "content": {"image/png": {}, "image/fits": {}},
                        },
                        "404": {"$ref": "#/components/responses/NotFound"},
                        **ERRORS,
                    },
                },
            },
            "/api/classifications/{survey}": {
                "parameters": [_path_param("survey", {"type": "string"})],
                "put": _op("Add classifications (admin)", obj),
                "delete": _op("Delete classifications (admin)", obj),
            },
            "/api/classifications/{survey}/{candid}": {
                "parameters": [
                    _path_param("survey", {"type": "string"}),
                    _path_param("candid", {"type": "integer", "minimum": 0}),
                ],
                "get": _op("Get classifications of an alert"),
            },
            "/api/triggers/{kind}": {
                "parameters": [
                    _path_param(
                        "kind",
                        {"type": "string", "enum": ["ztf", "ztf.test", "ztfmma", "ztfmma.test"]},
                    )
                ],
                "put": _op("Submit a ZTF ToO queue / MMA trigger (admin)", obj),
                "get": _op("Get ZTF queues / MMA triggers (admin)"),
                "delete": _op("Delete a ZTF queue / MMA trigger (admin)", obj),
            },
            "/api/skymap": {
                "put": _op("Add a skymap", obj),
                "get": _op("Get a skymap"),
                "delete": _op("Delete a skymap", obj),
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {
                "Success": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string"},
                        "message": {"type": "string"},
                        "data": {},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["status", "message"],
                    "properties": {
                        "status": {"type": "string", "enum": ["error"]},
                        "message": {"type": "string"},
                    },
                },
            },
            "responses": {
                name: {
                    "description": name,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for name in ("BadRequest", "Unauthorized", "Forbidden", "NotFound")
            },
        },
    }


DOCS_PAGE = """<!DOCTYPE html>
<html><head><title>{title} API</title><meta charset="utf-8"/></head>
<body><redoc spec-url="/docs/api/openapi.json"></redoc>
<noscript>The machine-readable description is at <a href="/docs/api/openapi.json">/docs/api/openapi.json</a>.</noscript>
<script src="https://cdn.redoc.ly/redoc/latest/bundles/redoc.standalone.js"></script>
</body></html>"""


async def spec_json(request: web.Request) -> web.Response:
    return web.Response(
        text=json.dumps(spec(request.app["config"])), content_type="application/json"
    )


async def docs_page(request: web.Request) -> web.Response:
    cfg: Config = request.app["config"]
    return web.Response(text=DOCS_PAGE.format(title=cfg.server.name), content_type="text/html")
