"""Run the ingester: `python -m ingester [--survey ZTF ...] [--until-idle SECONDS]`.

Admin: `python -m ingester failed-filters [--limit N] [--json]` lists the filter runs recorded
failed (a filter that kept failing on one alert after retries), newest first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
from typing import Any

from ingester.consumer import Ingester, close_cluster, enabled_surveys, start_cluster
from kowalski.config import load_config_or_exit
from kowalski.surveys import SURVEYS
from kowalski.testing.kafka import broker_ready


def failed_filters(argv: list[str]) -> int:
    from bson import json_util

    from ingester.filters import failed_runs
    from kowalski.db import async_client

    parser = argparse.ArgumentParser(
        prog="python -m ingester failed-filters",
        description="list filter runs recorded failed (newest first)",
    )
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="one JSON document per line")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit()

    async def fetch() -> list[dict[str, Any]]:
        client = async_client(cfg)
        try:
            return await failed_runs(client[cfg.database.db], cfg, args.limit)
        finally:
            await client.close()

    runs = asyncio.run(fetch())
    for run in runs:
        if args.json:
            print(json.dumps(json.loads(json_util.dumps(run)), sort_keys=True))
        else:
            print(
                f"{run['ran_at']:%Y-%m-%dT%H:%M:%S} filter {run['filter_id']} ({run['fid']}) "
                f"group {run['group_id']} candid {run['candids'][0]}: {run.get('error', '')}"
            )
    if not args.json:
        print(f"{len(runs)} failed filter run(s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["failed-filters"]:
        return failed_filters(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m ingester", description=__doc__)
    parser.add_argument(
        "--survey", action="append", choices=sorted(SURVEYS), help="default: enabled in config"
    )
    parser.add_argument(
        "--until-idle", type=float, help="stop after this many seconds without alerts"
    )
    parser.add_argument(
        "--threads", action="store_true", help="dask workers as threads, not processes"
    )
    args = parser.parse_args(argv)
    cfg = load_config_or_exit()
    logging.basicConfig(
        level=cfg.misc.logging_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    bootstrap = cfg.kafka.bootstrap_servers
    if not broker_ready(bootstrap, timeout=5):
        print(
            f"error: Kafka is not reachable at {bootstrap} (set KAFKA_BOOTSTRAP_SERVERS)",
            file=sys.stderr,
        )
        return 1
    surveys = args.survey or enabled_surveys(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    feed, delivery = None, None
    if cfg.misc.broker:  # the SkyPortal feed: set up before anything is consumed, or stop here
        from ingester.skyportal import FeedFactory, setup_or_exit
        from ingester.skyportal_delivery import DeliveryThread

        setup = setup_or_exit(cfg, surveys)
        feed, delivery = FeedFactory(cfg, setup), DeliveryThread(cfg, setup).start()
    try:
        client = start_cluster(cfg, processes=not args.threads)
        try:
            ingester = Ingester(cfg, client, bootstrap, surveys, handoff=feed)
            logging.getLogger("kowalski.ingester").info("consuming %s", ingester.patterns)
            report = ingester.run(stop=stop, until_idle=args.until_idle)
        finally:
            close_cluster(client)
    finally:
        if delivery is not None:
            logging.getLogger("kowalski.ingester").info("SkyPortal feed: %s", delivery.stop())
    logging.getLogger("kowalski.ingester").info("done: %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
