"""Request bodies: read and decoded once, JSON (form data accepted too, as upstream), always a
mapping; what is wrong with one is a 400 naming the fault, before any model sees it."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from api.responses import BadRequest
from api.safety import parse_json

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


async def body_text(request: web.Request) -> str:
    """The request body decoded with its declared charset (default UTF-8)."""
    raw = await request.read()
    charset = request.charset or "utf-8"
    try:
        return raw.decode(charset)
    except LookupError:
        raise BadRequest(f"unknown charset {charset!r} in Content-Type") from None
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid {charset}: {exc.reason}") from None


async def form_body(request: web.Request) -> dict[str, Any]:
    try:
        return dict(await request.post())
    except (ValueError, LookupError, AssertionError, KeyError, HttpProcessingError) as exc:
        raise BadRequest(f"malformed {request.content_type} body: {exc}") from None


async def read_body(request: web.Request) -> dict[str, Any]:
    """JSON body (form data accepted too, as upstream); always a mapping."""
    if request.content_type in FORM_TYPES:
        body = await form_body(request)
    else:
        text = await body_text(request)
        if not text.strip():
            return {}
        body = parse_json(text, "request body")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body
