"""/api/auth and /api/users in-process: authentication errors, token expiry and revocation."""

from __future__ import annotations

import datetime as dt

import jwt

from .apiclient import AppApi


async def test_auth_errors(api: AppApi) -> None:
    r = await api.call("POST", "/api/auth", json={"username": "admin", "password": "wrong"})
    assert r.status_code == 401 and r.json()["message"] == "Unauthorized"
    assert r.json()["reason"] == "wrong username or password"
    r = await api.call("POST", "/api/auth", json={"username": "admin"})
    assert r.status_code == 400 and r.json()["message"] == "missing password"
    r = await api.call(
        "POST",
        "/api/auth",
        json={"username": "admin", "password": "admin", "penquins.__version__": "0.1"},
    )
    assert r.status_code == 400 and "unsupported version of penquins" in r.json()["message"]
    r = await api.call("GET", "/", headers={"Authorization": "no_token"})
    assert r.status_code == 401 and r.json()["message"] == "Unauthorized"
    assert r.json()["reason"] == "token is invalid"


async def test_token_expiry_and_revocation(api: AppApi, users: dict[str, str]) -> None:
    secret = api.cfg.server.JWT_SECRET_KEY
    past = int(dt.datetime.now(dt.UTC).timestamp()) - 10
    admin_doc = api.db.users.find_one({"_id": "admin"})
    claims = {"user_id": "admin", "uid": admin_doc["uid"], "gen": admin_doc["token_generation"]}
    expired = jwt.encode({**claims, "iat": past - 100, "exp": past}, secret, algorithm="HS256")
    r = await api.call("GET", "/", expired)
    assert r.status_code == 401 and r.json()["reason"].startswith("token has expired")
    # a password change revokes the tokens issued before it
    admin = users["admin"]
    assert (
        await api.call("POST", "/api/users", admin, json={"username": "temp", "password": "one"})
    ).status_code == 200
    old = await api.token("temp", "one")
    assert (await api.call("GET", "/", old)).status_code == 200
    import time

    assert (
        await api.call("PUT", "/api/users/temp", admin, json={"password": "two"})
    ).status_code == 200
    time.sleep(5.5)  # per-process user cache
    r = await api.call("GET", "/", old)
    assert r.status_code == 401 and "revoked" in r.json()["reason"]
    assert (await api.call("GET", "/", await api.token("temp", "two"))).status_code == 200
    assert (await api.call("DELETE", "/api/users/temp", admin)).status_code == 200
