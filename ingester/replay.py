"""Produce real alert packets (e.g. the bundled `data/` night) to their nightly Kafka topics:
`ztf_<YYYYMMDD>_programid<N>`, `pgir_<date>`, `winter_<date>`, `turbo_<date>`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import Producer
from tqdm import tqdm

from ingester.decode import decode_packet
from kowalski.config import Config
from kowalski.surveys import SURVEYS, Survey, survey_of_path

JD_UNIX_EPOCH = 2440587.5


def night(jd: float) -> str:
    return (dt.datetime(1970, 1, 1) + dt.timedelta(days=jd - JD_UNIX_EPOCH)).strftime("%Y%m%d")


def topic_for(packet: bytes, survey: Survey, suffix: str = "") -> str:
    """The nightly topic a packet belongs to, from its own candidate (jd, programid)."""
    candidate = decode_packet(packet)[0]["candidate"]
    return survey.nightly_topic(night(candidate["jd"]), candidate) + suffix


def replay(
    bootstrap_servers: str,
    files: Iterable[Path],
    suffix: str = "",
    progress: bool = True,
    survey: Survey | None = None,
) -> dict[str, int]:
    """Produce every file's bytes unchanged; returns packets per topic. The survey of each file is
    `survey`, else the one whose data folder it lies in."""
    producer = Producer({"bootstrap.servers": bootstrap_servers, "message.max.bytes": 10_485_760})
    counts: dict[str, int] = {}
    paths = sorted(files)
    for path in tqdm(paths, desc="replaying alerts", unit="alert", disable=not progress):
        packet = path.read_bytes()
        topic = topic_for(packet, survey or survey_of_path(path), suffix)
        producer.produce(topic, packet)
        counts[topic] = counts.get(topic, 0) + 1
        producer.poll(0)
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"{remaining} packets were not delivered to Kafka")
    return counts


def ingest_files(cfg: Config, files: Iterable[Path], batch_size: int = 64) -> dict[str, int]:
    """Store packets straight through the pipeline (no Kafka): the same documents the streaming
    ingester writes. Used for fixtures, benchmarks, and `up --local` without a broker."""
    import asyncio

    from ingester.archive import prepare_database
    from ingester.ml import load_models
    from ingester.pipeline import BatchReport, Packet, Pipeline
    from kowalski.db import async_client

    by_survey: dict[str, list[Path]] = {}
    for path in sorted(files):
        by_survey.setdefault(survey_of_path(path).name, []).append(path)

    prepare_database(cfg, list(by_survey))

    async def run() -> dict[str, int]:
        client = async_client(cfg)
        try:
            pipeline = Pipeline(cfg, client[cfg.database.db], {"ZTF": load_models(cfg, "ZTF")})
            stored: dict[str, int] = {}
            for survey, paths in by_survey.items():
                report = BatchReport()
                for start in range(0, len(paths), batch_size):
                    chunk = paths[start : start + batch_size]
                    packets = [Packet(p.name, 0, i, p.read_bytes()) for i, p in enumerate(chunk)]
                    report.add(await pipeline.process(SURVEYS[survey], packets))
                stored[survey] = report.stored
            return stored
        finally:
            await client.close()

    return asyncio.run(run())
