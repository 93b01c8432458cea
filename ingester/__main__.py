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

from ingester.backfill import BackfillThread
from ingester.consumer import Ingester, close_cluster, start_cluster
from ingester.endpoint import serve
from kowalski.config import load_config_or_exit
from kowalski.services.kafka import broker_ready
from kowalski.surveys import SURVEYS


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
    surveys = args.survey or cfg.enabled_surveys()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    feed, delivery = None, None
    if cfg.misc.broker:  # the SkyPortal feed: set up (and retried) by its delivery thread
        from ingester.skyportal.delivery import DeliveryThread, waiting_for_setup
        from ingester.skyportal.stage import FeedFactory, check_token_or_exit

        check_token_or_exit(cfg)
        feed = FeedFactory(cfg)
        delivery = DeliveryThread(cfg, waiting_for_setup(surveys)).start()
    backfills = BackfillThread(cfg).start() if cfg.backfill.in_ingester else None
    try:
        client = start_cluster(cfg, processes=not args.threads)
        endpoint = None
        try:
            endpoint = serve(cfg, client)
            if endpoint is not None:
                logging.getLogger("kowalski.ingester").info(
                    "metrics on http://%s:%d/metrics", cfg.ingester.metrics_host, endpoint.port
                )
            ingester = Ingester(cfg, client, bootstrap, surveys, handoff=feed)
            logging.getLogger("kowalski.ingester").info("consuming %s", ingester.patterns)
            report = ingester.run(stop=stop, until_idle=args.until_idle)
        finally:
            if endpoint is not None:
                endpoint.stop()
            close_cluster(client)
    finally:
        if backfills is not None:
            backfills.stop()
        if delivery is not None:
            logging.getLogger("kowalski.ingester").info("SkyPortal feed: %s", delivery.stop())
    logging.getLogger("kowalski.ingester").info("done: %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
