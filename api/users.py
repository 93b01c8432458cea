"""Users (admin only): add, edit (rename, password, permissions, admin flag), delete, list, and
revoke all of a user's tokens (`POST /api/users/{username}/revoke`)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from api.auth import USER_CACHE, admin_required, hash_password, new_uid
from api.bodies import read_body
from api.models import UserCreate, UserUpdate, parse
from api.responses import BadRequest, NotFound, success
from api.state import CONFIG, collection
from kowalski.config import Config
from kowalski.documents import utcnow


def _users(request: web.Request) -> AsyncCollection[dict[str, Any]]:
    return collection(request, "users")


async def _hash(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, hash_password, password)


@admin_required
async def users_post(request: web.Request) -> web.Response:
    """POST /api/users: add a user."""
    body = parse(UserCreate, await read_body(request))
    username = body.username
    doc = {
        "_id": username,
        "email": body.email,
        "password": await _hash(body.password),
        "uid": new_uid(),
        "token_generation": 0,
        "permissions": body.permissions,
        "admin": body.admin,
        "last_modified": utcnow(),
    }
    try:
        await _users(request).insert_one(doc)
    except DuplicateKeyError:
        raise BadRequest(f"user {username} already exists") from None
    return success(f"added user {username}")


@admin_required
async def users_get(request: web.Request) -> web.Response:
    """GET /api/users: list users (no password hashes)."""
    docs = await _users(request).find({}, {"password": 0}).sort("_id", 1).to_list()
    return success("retrieved users", docs)


@admin_required
async def users_put(request: web.Request) -> web.Response:
    """PUT /api/users/{username}: rename, change password, permissions or admin flag."""
    cfg: Config = request.app[CONFIG]
    username = request.match_info["username"]
    body = parse(UserUpdate, await read_body(request))
    given = body.model_fields_set
    new_name = body.username
    if "admin" in given and username == cfg.server.admin_username and not body.admin:
        raise BadRequest("cannot take admin rights from the superuser!")
    if new_name and new_name != username and username == cfg.server.admin_username:
        raise BadRequest("cannot rename the superuser!")
    users = _users(request)
    doc = await users.find_one({"_id": username})
    if doc is None:
        raise NotFound(f"user {username} not found")
    update: dict[str, Any] = {"last_modified": utcnow()}
    revoke = bool(body.password)
    if revoke:
        update["password"] = await _hash(str(body.password))
    update.update(
        {key: getattr(body, key) for key in ("permissions", "admin", "email") if key in given}
    )
    if new_name and new_name != username:
        if await users.find_one({"_id": new_name}, {"_id": 1}):
            raise BadRequest(f"user {new_name} already exists")
        await users.insert_one({**doc, **update, "_id": new_name, "uid": new_uid()})
        await users.delete_one({"_id": username})
    else:
        changes: dict[str, Any] = {"$set": update}
        if revoke:
            changes["$inc"] = {"token_generation": 1}
        await users.update_one({"_id": username}, changes)
    request.app[USER_CACHE].invalidate(username)
    return success(f"edited user {username}")


@admin_required
async def users_revoke(request: web.Request) -> web.Response:
    """POST /api/users/{username}/revoke: every token issued to this user so far stops working
    (within a few seconds in every worker); the user logs in again for a new one."""
    username = request.match_info["username"]
    result = await _users(request).update_one({"_id": username}, {"$inc": {"token_generation": 1}})
    if result.matched_count == 0:
        raise NotFound(f"user {username} not found")
    request.app[USER_CACHE].invalidate(username)
    return success(f"revoked all tokens of user {username}")


@admin_required
async def users_delete(request: web.Request) -> web.Response:
    """DELETE /api/users/{username}: remove a user (never the superuser)."""
    cfg: Config = request.app[CONFIG]
    username = request.match_info["username"]
    if username == cfg.server.admin_username:
        raise BadRequest("cannot remove the superuser!")
    result = await _users(request).delete_one({"_id": username})
    if result.deleted_count == 0:
        raise NotFound(f"user {username} not found")
    request.app[USER_CACHE].invalidate(username)
    return success(f"removed user {username}")
