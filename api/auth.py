"""Authentication and authorization: JWT tokens, bcrypt passwords, users' program permissions.

Better than upstream: `exp` is a real numeric claim (expiry works); tokens issued before a user's
password change or deletion stop working; admins are any user with `admin: true` (plus the
configured superuser); every user carries the ZTF programids they may see.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import bcrypt
import jwt
from aiohttp import web
from bson import json_util

from api.responses import BadRequest, Forbidden, Unauthorized, json_response
from kowalski.config import Config

PUBLIC_PROGRAMIDS = [1]
ALL_PROGRAMIDS = [0, 1, 2, 3]
USER_CACHE_SECONDS = 5.0
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class User:
    username: str
    admin: bool
    programids: dict[str, list[int]] = field(default_factory=dict)
    tokens_valid_after: float = 0.0

    def allowed_programids(self, survey: str = "ZTF") -> list[int]:
        if self.admin:
            return ALL_PROGRAMIDS
        return self.programids.get(survey, PUBLIC_PROGRAMIDS)

    def sees_everything(self, survey: str = "ZTF") -> bool:
        return set(ALL_PROGRAMIDS) <= set(self.allowed_programids(survey))


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(12)).decode()


def check_password(password: str, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), hashed.encode())
    except ValueError:
        return False


def user_from_doc(doc: dict[str, Any], cfg: Config) -> User:
    permissions = doc.get("permissions") or {}
    programids = {
        survey: [int(p) for p in ids]
        for survey, ids in permissions.items()
        if isinstance(ids, list)
    }
    return User(
        username=doc["_id"],
        admin=bool(doc.get("admin")) or doc["_id"] == cfg.server.admin_username,
        programids=programids,
        tokens_valid_after=float(doc.get("tokens_valid_after", 0.0)),
    )


def issue_token(cfg: Config, username: str) -> str:
    now = dt.datetime.now(dt.UTC)
    payload: dict[str, Any] = {
        "user_id": username,
        "created_at": now.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        "iat": int(now.timestamp()),
    }
    if cfg.server.JWT_EXP_DELTA_SECONDS:
        payload["exp"] = int(now.timestamp()) + cfg.server.JWT_EXP_DELTA_SECONDS
    return jwt.encode(payload, cfg.server.JWT_SECRET_KEY, algorithm=cfg.server.JWT_ALGORITHM)


def token_from_header(header: str) -> str:
    """Accept `Bearer <jwt>` and the raw `<jwt>` (penquins sends the raw token)."""
    parts = header.strip().split()
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1]
    if len(parts) == 1:
        return parts[0]
    raise BadRequest("token is invalid: expected 'Authorization: Bearer <token>'")


def decode_token(cfg: Config, token: str) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            cfg.server.JWT_SECRET_KEY,
            algorithms=[cfg.server.JWT_ALGORITHM],
            options={"require": ["user_id"]},
        )
    except jwt.ExpiredSignatureError:
        raise BadRequest("token has expired: request a new one at /api/auth") from None
    except jwt.PyJWTError:
        raise BadRequest("token is invalid") from None


class UserCache:
    """Users looked up per request, kept a few seconds per process (permission changes,
    password changes and deletions take effect within USER_CACHE_SECONDS)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, User | None]] = {}

    def invalidate(self, username: str) -> None:
        self._entries.pop(username, None)

    async def get(self, request: web.Request, username: str) -> User | None:
        now = time.monotonic()
        hit = self._entries.get(username)
        if hit and hit[0] > now:
            return hit[1]
        cfg: Config = request.app["config"]
        doc = await request.app["db"][cfg.database.collections["users"]].find_one(
            {"_id": username}, {"password": 0}
        )
        user = user_from_doc(doc, cfg) if doc else None
        self._entries[username] = (now + USER_CACHE_SECONDS, user)
        return user


async def authenticate(request: web.Request) -> User | None:
    """The user behind the request's Authorization header, or None when there is none."""
    header = request.headers.get("Authorization")
    if not header:
        return None
    cfg: Config = request.app["config"]
    payload = decode_token(cfg, token_from_header(header))
    user = await request.app["user_cache"].get(request, str(payload["user_id"]))
    if user is None:
        raise Unauthorized("Unauthorized: the user of this token no longer exists")
    if float(payload.get("iat", 0)) < user.tokens_valid_after:
        raise Unauthorized("Unauthorized: token revoked (password changed); request a new one")
    return user


def current_user(request: web.Request) -> User:
    user: User | None = request.get("user")
    if user is None:
        raise Unauthorized(
            "Unauthorized: authentication required (header 'Authorization: Bearer <token>')"
        )
    return user


def admin_required(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        user = current_user(request)
        if not user.admin:
            raise Forbidden(f"Forbidden: {request.method} {request.path} requires an admin")
        return await handler(request)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def read_body(request: web.Request) -> dict[str, Any]:
    """JSON body (form data accepted too, as upstream); always a mapping."""
    if request.content_type in FORM_TYPES:
        body = dict(await request.post())
    else:
        text = await request.text()
        if not text.strip():
            return {}
        try:
            body = json_util.loads(text)
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def auth_post(request: web.Request) -> web.Response:
    """POST /api/auth: exchange username/password for a token."""
    cfg: Config = request.app["config"]
    body = await read_body(request)
    username, password = body.get("username"), body.get("password")
    if not username or not isinstance(username, str):
        raise BadRequest("missing username")
    if not password or not isinstance(password, str):
        raise BadRequest("missing password")
    version = body.get("penquins.__version__")
    if version is not None and version not in cfg.misc.supported_penquins_versions:
        raise BadRequest(f"unsupported version of penquins: {version}")
    doc = await request.app["db"][cfg.database.collections["users"]].find_one({"_id": username})
    hashed = doc.get("password", "") if doc else ""
    ok = await asyncio.get_running_loop().run_in_executor(None, check_password, password, hashed)
    if not doc or not ok:
        raise Unauthorized("Unauthorized: wrong username or password")
    return json_response({"status": "success", "token": issue_token(cfg, username)})
