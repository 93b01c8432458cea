"""Typed application state (aiohttp `AppKey`s): the configuration, the database client and
database, shared by every handler."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from kowalski.config import Config

CONFIG = web.AppKey("config", Config)
MONGO: web.AppKey[AsyncMongoClient[dict[str, Any]]] = web.AppKey("mongo", AsyncMongoClient)
DB: web.AppKey[AsyncDatabase[dict[str, Any]]] = web.AppKey("db", AsyncDatabase)


def collection(request: web.Request, key: str) -> AsyncCollection[dict[str, Any]]:
    """The configured collection `database.collections[key]`."""
    return request.app[DB][request.app[CONFIG].database.collections[key]]
