"""Database access: one URI, PyMongo's async client (successor of Motor), index management."""

from __future__ import annotations

from typing import Any, get_args
from urllib.parse import quote_plus

from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database
from pymongo.errors import OperationFailure

from kowalski.config import Config, IndexSpec, SystemCollection
from kowalski.documents import Doc


def mongo_uri(cfg: Config) -> str:
    """`database.uri` (env MONGODB_URI) if set, else built from host/port/credentials."""
    db = cfg.database
    if db.uri:
        return db.uri
    auth = ""
    if db.admin_username and db.admin_password:
        auth = f"{quote_plus(db.admin_username)}:{quote_plus(db.admin_password)}@"
    if db.srv:
        return f"mongodb+srv://{auth}{db.host}/?authSource=admin"
    options = f"replicaSet={db.replica_set}" if db.replica_set else "directConnection=true"
    return f"mongodb://{auth}{db.host}:{db.port}/?authSource=admin&{options}"


def async_client(cfg: Config, **kwargs: Any) -> AsyncMongoClient[Doc]:
    return AsyncMongoClient(
        mongo_uri(cfg), maxPoolSize=cfg.database.max_pool_size, tz_aware=False, **kwargs
    )


def sync_client(cfg: Config, **kwargs: Any) -> MongoClient[Doc]:
    return MongoClient(
        mongo_uri(cfg), maxPoolSize=cfg.database.max_pool_size, tz_aware=False, **kwargs
    )


# Kowalski's own collections that users may read: skymaps (shared), and back-fill passes (each
# user sees their own records: api/policy.py)
USER_READABLE: frozenset[SystemCollection] = frozenset({"skymaps", "filter_backfill_passes"})


def system_collection_names(cfg: Config) -> frozenset[str]:
    """Names (after config renaming) of the collections only admins may touch: every one of
    Kowalski's own but `USER_READABLE` (the outboxes and the ledger hold alerts and passes of
    every programid, so they are never open to a user's query)."""
    return frozenset(
        cfg.database.collection(key)
        for key in get_args(SystemCollection)
        if key not in USER_READABLE
    )


def _index_keys(spec: IndexSpec) -> list[tuple[str, int | str]]:
    return [(name, direction) for name, direction in spec.fields]


INDEX_CONFLICT_CODES = (85, 86)  # IndexOptionsConflict, IndexKeySpecsConflict
IndexKeys = list[tuple[str, int | str]]


def _same_index(existing: dict[str, Any], name: str, keys: IndexKeys) -> bool:
    info = existing.get(name)
    if not info:
        return False
    return [tuple(k) for k in info["key"]] == list(keys)


def create_index_sync(coll: Any, keys: IndexKeys, name: str, unique: bool = False) -> str:
    """create_index that accepts an identical index already there (servers differ in whether
    re-creating one, or two processes racing to create it, is an error)."""
    try:
        return str(coll.create_index(keys, name=name, unique=unique))
    except OperationFailure as exc:
        if exc.code in INDEX_CONFLICT_CODES and _same_index(coll.index_information(), name, keys):
            return name
        raise


async def create_index(coll: Any, keys: IndexKeys, name: str, unique: bool = False) -> str:
    try:
        return str(await coll.create_index(keys, name=name, unique=unique))
    except OperationFailure as exc:
        if exc.code in INDEX_CONFLICT_CODES and _same_index(
            await coll.index_information(), name, keys
        ):
            return name
        raise


async def ensure_indexes(db: AsyncDatabase[Doc], cfg: Config, collection: str) -> list[str]:
    """Create the configured indexes of `collection` (idempotent, safe to race); their names."""
    return [
        await create_index(db[collection], _index_keys(spec), spec.name, spec.unique)
        for spec in cfg.database.indexes.get(collection, [])
    ]


def ensure_indexes_sync(db: Database[Doc], cfg: Config, collection: str) -> list[str]:
    return [
        create_index_sync(db[collection], _index_keys(spec), spec.name, spec.unique)
        for spec in cfg.database.indexes.get(collection, [])
    ]
