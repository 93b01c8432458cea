"""Users (admin only): add, edit (rename, password, permissions, admin flag), delete, list, and
revoke all of a user's tokens (`POST /api/users/{username}/revoke`)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from aiohttp import web
from pymongo.errors import DuplicateKeyError

from api.auth import admin_required, hash_password, new_uid, read_body
from api.responses import BadRequest, NotFound, success
from kowalski.config import Config


def _users(request: web.Request) -> Any:
    cfg: Config = request.app["config"]
    return request.app["db"][cfg.database.collections["users"]]


def validate_permissions(value: Any) -> dict[str, list[int]]:
    """`{"ZTF": [1, 2]}`: survey -> programids this user may see."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest('permissions must be an object like {"ZTF": [1, 2]}')
    out: dict[str, list[int]] = {}
    for survey, ids in value.items():
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 3 for i in ids
        ):
            raise BadRequest(f"permissions.{survey} must be a list of programids in 0..3")
        out[str(survey)] = sorted(set(ids))
    return out


async def _hash(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, hash_password, password)


@admin_required
async def users_post(request: web.Request) -> web.Response:
    """POST /api/users: add a user."""
    body = await read_body(request)
    username, password = body.get("username"), body.get("password")
    if (
        not isinstance(username, str)
        or not username
        or not isinstance(password, str)
        or not password
    ):
        raise BadRequest("username and password must be set")
    doc = {
        "_id": username,
        "email": body.get("email"),
        "password": await _hash(password),
        "uid": new_uid(),
        "token_generation": 0,
        "permissions": validate_permissions(body.get("permissions")),
        "admin": bool(body.get("admin", False)),
        "last_modified": dt.datetime.now(dt.UTC).replace(tzinfo=None),
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
    cfg: Config = request.app["config"]
    username = request.match_info["username"]
    body = await read_body(request)
    users = _users(request)
    doc = await users.find_one({"_id": username})
    if doc is None:
        raise NotFound(f"user {username} not found")
    update: dict[str, Any] = {"last_modified": dt.datetime.now(dt.UTC).replace(tzinfo=None)}
    revoke = bool(body.get("password"))
    if revoke:
        update["password"] = await _hash(str(body["password"]))
    if "permissions" in body:
        update["permissions"] = validate_permissions(body["permissions"])
    if "admin" in body:
        if username == cfg.server.admin_username and not body["admin"]:
            raise BadRequest("cannot take admin rights from the superuser!")
        update["admin"] = bool(body["admin"])
    if "email" in body:
        update["email"] = body["email"]
    new_name = body.get("username")
    if new_name and new_name != username:
        if username == cfg.server.admin_username:
            raise BadRequest("cannot rename the superuser!")
        if await users.find_one({"_id": new_name}, {"_id": 1}):
            raise BadRequest(f"user {new_name} already exists")
        await users.insert_one({**doc, **update, "_id": new_name, "uid": new_uid()})
        await users.delete_one({"_id": username})
    else:
        changes: dict[str, Any] = {"$set": update}
        if revoke:
            changes["$inc"] = {"token_generation": 1}
        await users.update_one({"_id": username}, changes)
    request.app["user_cache"].invalidate(username)
    return success(f"edited user {username}")


@admin_required
async def users_revoke(request: web.Request) -> web.Response:
    """POST /api/users/{username}/revoke: every token issued to this user so far stops working
    (within a few seconds in every worker); the user logs in again for a new one."""
    username = request.match_info["username"]
    result = await _users(request).update_one({"_id": username}, {"$inc": {"token_generation": 1}})
    if result.matched_count == 0:
        raise NotFound(f"user {username} not found")
    request.app["user_cache"].invalidate(username)
    return success(f"revoked all tokens of user {username}")


@admin_required
async def users_delete(request: web.Request) -> web.Response:
    """DELETE /api/users/{username}: remove a user (never the superuser)."""
    cfg: Config = request.app["config"]
    username = request.match_info["username"]
    if username == cfg.server.admin_username:
        raise BadRequest("cannot remove the superuser!")
    result = await _users(request).delete_one({"_id": username})
    if result.deleted_count == 0:
        raise NotFound(f"user {username} not found")
    request.app["user_cache"].invalidate(username)
    return success(f"removed user {username}")
