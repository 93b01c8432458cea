"""OpenAPI 3 description of the API, generated from the app's route table and the request models
(`api/models.py`); served at /docs/api/openapi.json with a ReDoc page at /docs/api."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from api import models
from api.middlewares import is_public
from api.queries import QUERY_TYPES
from api.state import CONFIG
from kowalski.config import Config
from kowalski.surveys import SURVEYS

REF_TEMPLATE = "#/components/schemas/{model}"
HIDDEN_PREFIX = "/docs/api"  # the documentation itself is not documented
ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
}
# request bodies: (method, path) -> model, or a ready schema
REQUEST_BODIES: dict[tuple[str, str], type[BaseModel] | dict[str, Any]] = {
    ("POST", "/api/auth"): models.AuthRequest,
    ("POST", "/api/users"): models.UserCreate,
    ("PUT", "/api/users/{username}"): models.UserUpdate,
    ("POST", "/api/filters"): models.FilterCreate,
    ("PATCH", "/api/filters"): models.FilterPatch,
    ("POST", "/api/filters/{filter_id}/test"): models.FilterTest,
    ("POST", "/api/filters/{filter_id}/backfill"): models.BackfillCreate,
    ("POST", "/api/filters/{filter_id}/explain"): models.FilterExplain,
    ("PUT", "/api/classifications/{survey}"): models.ClassificationsPut,
    ("DELETE", "/api/classifications/{survey}"): models.ClassificationsDelete,
    ("PUT", "/api/triggers/{kind}"): {
        "anyOf": [{"$ref": REF_TEMPLATE.format(model=m.__name__)} for m in models.TRIGGERS]
    },
    ("DELETE", "/api/triggers/{kind}"): models.TriggerDelete,
    ("PUT", "/api/skymap"): models.SkymapPut,
    ("DELETE", "/api/skymap"): models.SkymapDelete,
}
PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "filter_id": {"type": "integer", "minimum": 1},
    "candid": {  # the detection id: candid (ZTF, ...), diaSourceId (LSST)
        "type": "integer",
        "minimum": 0,
    },
    "survey": {"type": "string", "enum": [s.key for s in SURVEYS.values()]},
    "cutout": {"type": "string", "enum": ["science", "template", "difference"]},
    "file_format": {"type": "string", "enum": ["fits", "png"]},
    "kind": {"type": "string", "enum": ["ztf", "ztf.test", "ztfmma", "ztfmma.test"]},
}
IMAGE_PATH = "/api/cutouts/{survey}/{candid}/{cutout}/{file_format}"


def openapi_compatible(node: Any) -> Any:
    """JSON schema as OpenAPI 3.0 reads it: no `null` types (`nullable` instead), no titles,
    no `null` defaults."""
    if isinstance(node, list):
        return [openapi_compatible(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: openapi_compatible(v)
        for k, v in node.items()
        if k != "title" and not (k == "default" and v is None)
    }
    for key in ("anyOf", "oneOf"):
        options = out.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            out.pop(key)
            out.update(rest[0] if len(rest) == 1 else {key: rest})
            out["nullable"] = True
    return out


def model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """The model's schema, its nested models moved to `components`."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    for name, nested in schema.pop("$defs", {}).items():
        components[name] = openapi_compatible(nested)
    return dict(openapi_compatible(schema))


def queries_schema(components: dict[str, Any]) -> dict[str, Any]:
    """The body of `POST /api/queries`: one alternative per query type."""
    options = model_schema(models.QueryOptions, components)
    return {
        "oneOf": [
            {
                "type": "object",
                "description": f"{name} query",
                "required": ["query_type", "query"],
                "properties": {
                    "query_type": {"type": "string", "enum": [name]},
                    "query": model_schema(kind.model, components),
                    "kwargs": options,
                },
            }
            for name, kind in QUERY_TYPES.items()
        ]
    }


def body_schema(method: str, path: str, components: dict[str, Any]) -> dict[str, Any] | None:
    if (method, path) == ("POST", "/api/queries"):
        return queries_schema(components)
    body = REQUEST_BODIES.get((method, path))
    if body is None or isinstance(body, dict):
        return body
    return model_schema(body, components)


def summary(handler: Any) -> str:
    """The handler docstring's first sentence, without the `METHOD /path:` it starts with."""
    doc = (handler.__doc__ or handler.__name__).strip().splitlines()[0]
    return re.sub(r"^[A-Z]+(/[A-Z]+)*( /\S*)?:\s*", "", doc).rstrip(".") or doc


def responses(path: str) -> dict[str, Any]:
    if path == IMAGE_PATH:
        image = {"description": "image", "content": {"image/png": {}, "image/fits": {}}}
        return {"200": image, "404": {"$ref": "#/components/responses/NotFound"}, **ERRORS}
    ok = {
        "description": "success",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Success"}}},
    }
    return {"200": ok, **ERRORS}


JOB_ID = {
    "name": "job_id",
    "in": "query",
    "required": False,
    "description": "one job (default: every job of the filter the user may see)",
    "schema": {"type": "string"},
}
# query-string parameters per (method, path pattern)
QUERY_PARAMETERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("GET", "/api/filters/{filter_id}/backfill"): [JOB_ID],
    ("DELETE", "/api/filters/{filter_id}/backfill"): [JOB_ID],
}


def operation(method: str, path: str, handler: Any, components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary(handler), "responses": responses(path)}
    names = re.findall(r"{(\w+)}", path)
    if names:
        op["parameters"] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": PATH_PARAMETERS.get(name, {"type": "string"}),
            }
            for name in names
        ]
    query = QUERY_PARAMETERS.get((method, re.sub(r"{(\w+):[^}]+}", r"{\1}", path)), [])
    if query:
        op["parameters"] = [*op.get("parameters", []), *query]
    body = body_schema(method, path, components)
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if is_public(path):
        op["security"] = []
    return op


def paths(router: web.UrlDispatcher, components: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for route in router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method == "HEAD" or not path or path.startswith(HIDDEN_PREFIX):
            continue
        method = route.method.upper()
        out.setdefault(path, {})[method.lower()] = operation(
            method, path, route.handler, components
        )
    return out


def envelope_schemas() -> dict[str, Any]:
    return {
        "Success": {
            "type": "object",
            "properties": {"status": {"type": "string"}, "message": {"type": "string"}, "data": {}},
        },
        "Error": {
            "type": "object",
            "required": ["status", "message"],
            "properties": {
                "status": {"type": "string", "enum": ["error"]},
                "message": {"type": "string"},
            },
        },
    }


def spec(cfg: Config, router: web.UrlDispatcher) -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in models.TRIGGERS:
        components[model.__name__] = model_schema(model, components)
    documented = paths(router, components)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": cfg.server.name,
            "version": cfg.server.version,
            "description": cfg.server.description,
            "contact": {"name": cfg.server.contact.name, "email": cfg.server.contact.email},
        },
        "security": [{"bearerAuth": []}],
        "paths": documented,
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {**envelope_schemas(), **components},
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
    """GET /docs/api/openapi.json: this document."""
    document = spec(request.app[CONFIG], request.app.router)
    return web.Response(text=json.dumps(document), content_type="application/json")


async def docs_page(request: web.Request) -> web.Response:
    """GET /docs/api: the ReDoc page."""
    cfg: Config = request.app[CONFIG]
    return web.Response(text=DOCS_PAGE.format(title=cfg.server.name), content_type="text/html")
