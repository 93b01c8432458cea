"""API mode: concurrent penquins-style queries against the API served by gunicorn (as in
production, kowalski/services/api.py) over the archived benchmark night.

Each client loops over a fixed mix of what penquins users send: `cone_search` of a few objects over
the alerts and the (SYNTHETIC) catalogs, `find` of an object's alerts by objectId, `find_one` by
candid. Reported: requests/s over the run and p50/p99 latency per query type.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.night import percentile
from bench.nightdata import ZTF, Night
from kowalski.config import Config
from kowalski.services.api import ApiServer
from kowalski.services.process import free_port

Doc = dict[str, Any]


def cone_query(cfg: Config, night: Night, rng: random.Random, objects: int) -> Doc:
    chosen = rng.sample(night.objects, min(objects, len(night.objects)))
    catalogs = list(cfg.database.xmatch.get(ZTF.name, {}))[:2]
    return {
        "query_type": "cone_search",
        "query": {
            "object_coordinates": {
                "cone_search_radius": 2,
                "cone_search_unit": "arcsec",
                "radec": {o.object_id: [o.ra, o.dec] for o in chosen},
            },
            "catalogs": {
                ZTF.alerts_collection(cfg): {
                    "filter": {},
                    "projection": {"_id": 0, "candid": 1, "objectId": 1},
                },
                **{c: {"filter": {}, "projection": {"_id": 1}} for c in catalogs},
            },
        },
    }


def find_query(cfg: Config, night: Night, rng: random.Random) -> Doc:
    return {
        "query_type": "find",
        "query": {
            "catalog": ZTF.alerts_collection(cfg),
            "filter": {"objectId": rng.choice(night.objects).object_id},
            "projection": {"_id": 0, "candid": 1, "candidate.jd": 1, "candidate.magpsf": 1},
        },
    }


def find_one_query(cfg: Config, night: Night, rng: random.Random) -> Doc:
    return {
        "query_type": "find_one",
        "query": {
            "catalog": ZTF.alerts_collection(cfg),
            "filter": {"candid": rng.choice(night.alerts).candid},
        },
    }


def request_mix(cfg: Config, night: Night, rng: random.Random) -> tuple[str, Doc]:
    kind = rng.choice(["cone_search_1", "cone_search_10", "find", "find_one"])
    if kind == "cone_search_1":
        return kind, cone_query(cfg, night, rng, 1)
    if kind == "cone_search_10":
        return kind, cone_query(cfg, night, rng, 10)
    if kind == "find":
        return kind, find_query(cfg, night, rng)
    return kind, find_one_query(cfg, night, rng)


async def load(
    url: str, cfg: Config, night: Night, requests: int, concurrency: int, seed: int
) -> Doc:
    rng = random.Random(seed)
    work = [request_mix(cfg, night, rng) for _ in range(requests)]
    latencies: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{url}/api/auth", json={"username": "admin", "password": "admin"}
        ) as auth:
            auth.raise_for_status()
            headers = {"Authorization": (await auth.json())["token"]}  # raw, as penquins

        async def client() -> None:
            while work:
                kind, body = work.pop()
                start = time.perf_counter()
                async with session.post(f"{url}/api/queries", json=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
                if ok:
                    latencies.setdefault(kind, []).append((time.perf_counter() - start) * 1e3)
                else:
                    errors[kind] = errors.get(kind, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    done = sum(len(v) for v in latencies.values())
    everything = [x for v in latencies.values() for x in v]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "requests_per_s": done / wall,
        "errors": errors,
        "latency_ms": {"p50": percentile(everything, 50), "p99": percentile(everything, 99)},
        "by_query": {
            kind: {"count": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
            for kind, v in sorted(latencies.items())
        },
    }


def run_api(
    cfg: Config,
    env: dict[str, str],
    night: Night,
    workdir: Path,
    requests: int,
    concurrency: int,
    processes: int,
) -> Doc:
    server = ApiServer(cfg, free_port(), workdir / "api.log", env, workers=processes).start()
    try:
        result = asyncio.run(load(server.url, cfg, night, requests, concurrency, night.spec.seed))
    finally:
        server.stop()
    return {**result, "api_processes": processes}
