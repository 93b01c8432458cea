"""Response envelopes: `{"status", "message", "data"}` in MongoDB Extended JSON (relaxed), as
upstream Kowalski sends them and penquins/SkyPortal decode them with `bson.json_util.loads`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from bson import json_util

JSON_OPTIONS = json_util.RELAXED_JSON_OPTIONS
CONTENT_TYPE = "application/json"


class ApiError(Exception):
    """An error with an HTTP status and a message that says what is wrong (and, where clients
    match on a fixed message, the details as `reason`)."""

    status = 400

    def __init__(self, message: str, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message if reason is None else f"{message}: {reason}")
        self.message = message
        self.reason = reason
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    """401 `{"status": "error", "message": "Unauthorized", "reason": …}`: the message clients
    match on (as upstream), the reason for people and logs."""

    status = 401

    def __init__(self, reason: str) -> None:
        super().__init__("Unauthorized", reason=reason)


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class TooManyRequests(ApiError):
    status = 429


def dumps(obj: Any) -> str:
    return json_util.dumps(obj, json_options=JSON_OPTIONS)


def json_response(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(text=dumps(body), status=status, content_type=CONTENT_TYPE)


def success(message: str, data: Any = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"status": "success", "message": message, **extra}
    if data is not None:
        body["data"] = data
    return json_response(body)


def error(message: str, status: int = 400, reason: str | None = None) -> web.Response:
    body = {"status": "error", "message": message}
    if reason is not None:
        body["reason"] = reason
    return json_response(body, status=status)


async def stream_list(
    request: web.Request, message: str, first: list[Any], rest: AsyncIterator[Any]
) -> web.StreamResponse:
    """Send `{"status":"success","message":…,"data":[…]}` writing documents as they come.

    `first` is the first batch, fetched before the status line is committed, so that query
    errors (bad operator, time limit) still become a proper 400.
    """
    response = web.StreamResponse(status=200)
    response.content_type = CONTENT_TYPE
    await response.prepare(request)
    head = dumps({"status": "success", "message": message})[:-1]
    await response.write(f'{head}, "data": ['.encode())
    count = 0
    chunk: list[str] = []
    for doc in first:
        chunk.append(dumps(doc))
    async for doc in rest:
        chunk.append(dumps(doc))
        if len(chunk) >= 256:
            await response.write(((", " if count else "") + ", ".join(chunk)).encode())
            count += len(chunk)
            chunk = []
    if chunk:
        await response.write(((", " if count else "") + ", ".join(chunk)).encode())
    await response.write(b"]}")
    await response.write_eof()
    return response


INT64_MAX = 2**63 - 1


def path_int(request: web.Request, name: str) -> int:
    """An integer path parameter (the route already requires digits), checked to fit in 64 bits."""
    value = int(request.match_info[name])
    if value > INT64_MAX:
        raise BadRequest(f"{name} must be at most {INT64_MAX}")
    return value
