"""The aiohttp application: `app_factory` is what gunicorn serves
(`gunicorn --worker-class aiohttp.GunicornUVLoopWebWorker api.app:app_factory`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from pymongo.errors import DuplicateKeyError

from api import (
    backfill,
    classifications,
    cutouts,
    filters,
    openapi,
    operations,
    queries,
    skymap,
    triggers,
    users,
)
from api.auth import USER_CACHE, UserCache, auth_post, dummy_hash, hash_password, new_uid
from api.middlewares import auth_middleware, error_middleware, metrics_middleware
from api.queries import QUERY_SLOTS, QuerySlots
from api.responses import success
from api.state import CONFIG, DB, MONGO
from kowalski.config import Config, check_secrets, default_secrets, load_config
from kowalski.db import async_client, create_index, ensure_indexes
from kowalski.documents import utcnow

log = logging.getLogger("kowalski.api")


async def ping(request: web.Request) -> web.Response:
    """GET /: ping."""
    return success("greetings from Kowalski!")


async def ensure_admin(app: web.Application) -> None:
    cfg: Config = app[CONFIG]
    users_coll = app[DB][cfg.database.collection("users")]
    if await users_coll.find_one({"_id": cfg.server.admin_username}, {"_id": 1}):
        return
    with contextlib.suppress(DuplicateKeyError):  # another gunicorn worker created it first
        await users_coll.insert_one(
            {
                "_id": cfg.server.admin_username,
                "email": cfg.server.contact.email,
                "password": hash_password(cfg.server.admin_password),
                "uid": new_uid(),
                "token_generation": 0,
                "permissions": {},
                "admin": True,
                "last_modified": utcnow(),
            }
        )


async def database_context(app: web.Application) -> AsyncIterator[None]:
    cfg: Config = app[CONFIG]
    if default_secrets(cfg):
        log.warning("insecure_dev: serving with default %s", " and ".join(default_secrets(cfg)))
    client = async_client(cfg)
    try:  # closed on this loop also when the startup below fails
        app[MONGO] = client
        app[DB] = client[cfg.database.db]
        await ensure_admin(app)
        filters_coll = app[DB][cfg.database.collection("filters")]
        await create_index(filters_coll, [("filter_id", 1)], "filter_id", unique=True)
        if cfg.database.build_indexes:
            for key in ("skymaps", "alerts_ztf_classifications"):
                await ensure_indexes(app[DB], cfg, cfg.database.collections[key])
        yield
    finally:
        await client.close()


def routes(app: web.Application) -> None:
    app.router.add_get("/", ping)
    app.router.add_post("/api/auth", auth_post)
    app.router.add_get("/api/users", users.users_get)
    app.router.add_post("/api/users", users.users_post)
    app.router.add_put("/api/users/{username}", users.users_put)
    app.router.add_delete("/api/users/{username}", users.users_delete)
    app.router.add_post("/api/users/{username}/revoke", users.users_revoke)
    app.router.add_post("/api/queries", queries.queries_post)
    app.router.add_post("/api/filters", filters.filters_post)
    app.router.add_patch("/api/filters", filters.filters_patch)
    app.router.add_get(r"/api/filters/{filter_id:[0-9]+}", filters.filters_get)
    app.router.add_delete(r"/api/filters/{filter_id:[0-9]+}", filters.filters_delete)
    app.router.add_post(r"/api/filters/{filter_id:[0-9]+}/test", filters.filters_test)
    app.router.add_post(r"/api/filters/{filter_id:[0-9]+}/backfill", backfill.backfill_post)
    app.router.add_get(r"/api/filters/{filter_id:[0-9]+}/backfill", backfill.backfill_get)
    app.router.add_delete(r"/api/filters/{filter_id:[0-9]+}/backfill", backfill.backfill_delete)
    app.router.add_post(r"/api/filters/{filter_id:[0-9]+}/explain", backfill.explain_post)
    app.router.add_get(
        r"/api/cutouts/{survey}/{candid:[0-9]+}/{cutout}/{file_format}", cutouts.cutout_get
    )
    app.router.add_put("/api/classifications/{survey}", classifications.classifications_put)
    app.router.add_delete("/api/classifications/{survey}", classifications.classifications_delete)
    app.router.add_get(
        r"/api/classifications/{survey}/{candid:[0-9]+}", classifications.classifications_get
    )
    trigger_kinds = r"/api/triggers/{kind:ztf|ztf\.test|ztfmma|ztfmma\.test}"
    app.router.add_put(trigger_kinds, triggers.trigger_put)
    app.router.add_get(trigger_kinds, triggers.trigger_get)
    app.router.add_delete(trigger_kinds, triggers.trigger_delete)
    app.router.add_put("/api/skymap", skymap.skymap_put)
    app.router.add_get("/api/skymap", skymap.skymap_get)
    app.router.add_delete("/api/skymap", skymap.skymap_delete)
    app.router.add_get("/docs/api/", openapi.docs_page)
    app.router.add_get("/docs/api", openapi.docs_page)
    app.router.add_get("/docs/api/openapi.json", openapi.spec_json)
    app.router.add_get("/metrics", operations.metrics_get)
    app.router.add_get("/healthz", operations.healthz)
    app.router.add_get("/readyz", operations.readyz)


async def app_factory(cfg: Config | None = None) -> web.Application:
    cfg = cfg or load_config()
    check_secrets(cfg)
    logging.basicConfig(
        level=cfg.misc.logging_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, auth_middleware],
        client_max_size=cfg.server.client_max_size,
    )
    app[CONFIG] = cfg
    app[USER_CACHE] = UserCache()
    await asyncio.to_thread(dummy_hash)  # before the first login (no slower first unknown user)
    app[QUERY_SLOTS] = QuerySlots(cfg.misc.max_concurrent_queries)
    app.cleanup_ctx.append(database_context)
    routes(app)
    return app
