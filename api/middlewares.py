"""Middlewares: authentication for every route except the public ones, and errors that keep
their meaning (status and message) instead of being rewritten to reason phrases."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from bson.errors import InvalidDocument
from pymongo.errors import (
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from api.auth import USER, Handler, authenticate
from api.policy import data_rights
from api.responses import ApiError, error
from kowalski import metrics

log = logging.getLogger("kowalski.api")

PUBLIC_PATHS = frozenset({"/api/auth", "/healthz", "/readyz"})
PUBLIC_PREFIXES = ("/docs/api",)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests by route pattern, method and status, and their latency (kowalski/metrics.py)."""
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.API_SECONDS.labels(name, request.method).observe(time.perf_counter() - started)
        metrics.API_REQUESTS.labels(name, request.method, str(status)).inc()
        if status == 401:
            metrics.API_AUTH_FAILURES.inc()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.reason is not None:
            log.info(
                "%s %s: %d %s: %s",
                request.method,
                request.path,
                exc.status,
                exc.message,
                exc.reason,
            )
        return error(exc.message, exc.status, exc.reason)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return error(reason, exc.status)
    except ExecutionTimeout as exc:
        return error(
            f"query exceeded max_time_ms: {exc.details.get('errmsg') if exc.details else exc}", 400
        )
    except OperationFailure as exc:
        message = exc.details.get("errmsg") if exc.details else str(exc)
        return error(f"database refused the operation: {message}", 400)
    except ServerSelectionTimeoutError:
        log.exception("database unreachable")
        return error("database unavailable, try again later", 503)
    except PyMongoError as exc:
        log.exception("database error")
        return error(f"database error: {type(exc).__name__}", 503)
    except (InvalidDocument, OverflowError) as exc:
        # user input that cannot be stored or queried as BSON (e.g. integers beyond 64 bits)
        return error(f"value cannot be represented in the database: {exc}", 400)
    except ValueError as exc:  # conversions of user input (int(), dates, ...)
        return error(f"{type(exc).__name__}: {exc}", 400)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error("Internal Server Error: the server logged the details", 500)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route but the public ones needs a valid token; public routes (`/api/auth`, the
    docs) ignore the Authorization header, so a stale token never stands in the way."""
    if is_public(request.path):
        request[USER] = None
        return await handler(request)
    request[USER] = await authenticate(request)
    data_rights(request)  # one data-rights object per request, built from the user
    return await handler(request)
