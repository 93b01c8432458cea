"""Authentication and authorization: JWT tokens, bcrypt passwords, users' program permissions.

Better than upstream: `exp` is a real numeric claim (expiry works when configured; the default,
as upstream, is tokens that do not expire); every token carries `iat`, the user's id (`uid`, new
for every created user) and the user's token generation (`gen`): a password change, an admin's
`POST /api/users/{username}/revoke`, deleting or renaming the user all invalidate earlier tokens
(within USER_CACHE_SECONDS in every worker), and tokens without these claims are refused. A
token newer than a worker's cached user (issued after a password change made in another worker)
reloads the user before it is judged. Logins of unknown users cost one bcrypt check, as known
users' do (no username enumeration by timing); `server.token_ttl` limits tokens' lifetime.
Admins are any user with `admin: true` (plus the configured superuser); every user carries the
ZTF programids they may see.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import bcrypt
import jwt
from aiohttp import web

from api.bodies import read_body
from api.models import AuthRequest, parse
from api.responses import BadRequest, Forbidden, Unauthorized, json_response
from api.state import CONFIG, DB
from kowalski.config import Config
from kowalski.surveys import SURVEYS

USER_CACHE_SECONDS = 5.0
REQUIRED_CLAIMS = ["user_id", "iat", "uid", "gen"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("kowalski.api")


@dataclass(frozen=True)
class User:
    username: str
    admin: bool
    uid: str = ""
    generation: int = 0
    programids: dict[str, list[int]] = field(default_factory=dict)

    def allowed_programids(self, survey: str) -> list[int]:
        """The programids of `survey` (registry name) this user may see."""
        known = SURVEYS[survey]
        if self.admin:
            return list(known.programids)
        return self.programids.get(survey, list(known.public_programids))

    def sees_everything(self, survey: str) -> bool:
        return set(SURVEYS[survey].programids) <= set(self.allowed_programids(survey))


BCRYPT_ROUNDS = 12


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


@functools.cache
def dummy_hash() -> str:
    """A hash of the same cost as users' that no password matches: unknown users and users
    without a usable hash are checked against it, so that every login costs one bcrypt check."""
    return hash_password(secrets.token_urlsafe(32))


def usable_hash(hashed: str) -> bool:
    return hashed.startswith(("$2a$", "$2b$", "$2y$")) and len(hashed) == 60


def check_password(password: str, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), hashed.encode())
    except ValueError:
        return False


def new_uid() -> str:
    """A user id that is never reused: a re-created (or renamed) user gets a new one."""
    return secrets.token_hex(12)


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
        uid=str(doc.get("uid") or ""),
        generation=int(doc.get("token_generation") or 0),
        programids=programids,
    )


def token_lifetime(cfg: Config) -> int | None:
    """Seconds a token is valid: `server.token_ttl`, or upstream's `JWT_EXP_DELTA_SECONDS`;
    None: tokens do not expire."""
    return cfg.server.token_ttl or cfg.server.JWT_EXP_DELTA_SECONDS


def issue_token(cfg: Config, user: User) -> str:
    now = dt.datetime.now(dt.UTC)
    payload: dict[str, Any] = {
        "user_id": user.username,
        "uid": user.uid,
        "gen": user.generation,
        "created_at": now.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        "iat": int(now.timestamp()),
    }
    lifetime = token_lifetime(cfg)
    if lifetime:
        payload["exp"] = int(now.timestamp()) + lifetime
    return jwt.encode(payload, cfg.server.JWT_SECRET_KEY, algorithm=cfg.server.JWT_ALGORITHM)


def token_from_header(header: str) -> str:
    """Accept `Bearer <jwt>` and the raw `<jwt>` (penquins sends the raw token)."""
    parts = header.strip().split()
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1]
    if len(parts) == 1:
        return parts[0]
    raise Unauthorized("token is invalid: expected 'Authorization: Bearer <token>'")


def decode_token(cfg: Config, token: str) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            cfg.server.JWT_SECRET_KEY,
            algorithms=[cfg.server.JWT_ALGORITHM],
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token has expired: request a new one at /api/auth") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"token is invalid: {exc}; request a new one at /api/auth") from None
    except jwt.PyJWTError:
        raise Unauthorized("token is invalid") from None


class UserCache:
    """Users kept USER_CACHE_SECONDS per process, so that authentication does not read the
    database on every request; permission changes and revocations take effect within that time
    in every worker (at once in the worker that made them)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, User | None]] = {}

    def invalidate(self, username: str) -> None:
        self._entries.pop(username, None)

    async def get(self, request: web.Request, username: str) -> User | None:
        now = time.monotonic()
        hit = self._entries.get(username)
        if hit and hit[0] > now:
            return hit[1]
        return await self.load(request, username)

    async def load(self, request: web.Request, username: str) -> User | None:
        """The user as stored now (cached from now on)."""
        now = time.monotonic()
        cfg: Config = request.app[CONFIG]
        doc = await request.app[DB][cfg.database.collection("users")].find_one(
            {"_id": username}, {"password": 0}
        )
        user = user_from_doc(doc, cfg) if doc else None
        self._entries[username] = (now + USER_CACHE_SECONDS, user)
        return user


USER_CACHE = web.AppKey("user_cache", UserCache)


async def authenticate(request: web.Request) -> User | None:
    """The user behind the request's Authorization header, or None when there is none."""
    header = request.headers.get("Authorization")
    if not header:
        return None
    cfg: Config = request.app[CONFIG]
    payload = decode_token(cfg, token_from_header(header))
    cache, username = request.app[USER_CACHE], str(payload["user_id"])
    user = await cache.get(request, username)
    if not matches(payload, user) and not older(payload, user):
        # the token is newer than this worker's cached user (a password change, revocation or
        # re-creation made through another worker): judge it by the stored user
        user = await cache.load(request, username)
    if user is None or not user.uid or payload["uid"] != user.uid:
        raise Unauthorized("the user of this token no longer exists")
    if payload["gen"] != user.generation:
        raise Unauthorized("token revoked (password changed or revoked by an admin)")
    return user


def matches(payload: dict[str, Any], user: User | None) -> bool:
    return user is not None and payload["uid"] == user.uid and payload["gen"] == user.generation


def older(payload: dict[str, Any], user: User | None) -> bool:
    """A token of the cached user issued before its current generation: refused as it is."""
    gen = payload["gen"]
    return (
        user is not None
        and payload["uid"] == user.uid
        and isinstance(gen, int)
        and gen < user.generation
    )


USER: web.RequestKey[User | None] = web.RequestKey("user")


def current_user(request: web.Request) -> User:
    user: User | None = request.get(USER)
    if user is None:
        raise Unauthorized("authentication required (header 'Authorization: Bearer <token>')")
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


async def ensure_uid(request: web.Request, doc: dict[str, Any]) -> dict[str, Any]:
    """Users stored before token ids existed get one at their next login."""
    if doc.get("uid"):
        return doc
    cfg: Config = request.app[CONFIG]
    users = request.app[DB][cfg.database.collection("users")]
    await users.update_one({"_id": doc["_id"], "uid": None}, {"$set": {"uid": new_uid()}})
    request.app[USER_CACHE].invalidate(doc["_id"])
    return await users.find_one({"_id": doc["_id"]}, {"password": 0}) or doc


async def auth_post(request: web.Request) -> web.Response:
    """POST /api/auth: exchange username/password for a token."""
    cfg: Config = request.app[CONFIG]
    body = parse(AuthRequest, await read_body(request))
    username, password, version = body.username, body.password, body.penquins_version
    if version is not None and version not in cfg.misc.supported_penquins_versions:
        raise BadRequest(f"unsupported version of penquins: {version}")
    doc = await request.app[DB][cfg.database.collection("users")].find_one({"_id": username})
    hashed = str(doc.get("password") or "") if doc else ""
    if not usable_hash(hashed):
        hashed = dummy_hash()  # the same bcrypt work as for a known user: no timing oracle
    ok = await asyncio.get_running_loop().run_in_executor(None, check_password, password, hashed)
    if not doc or not ok:
        raise Unauthorized("wrong username or password")
    user = user_from_doc(await ensure_uid(request, doc), cfg)
    return json_response({"status": "success", "token": issue_token(cfg, user)})
