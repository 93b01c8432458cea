"""Produce real alert packets (e.g. the bundled `data/` night) to their survey's Kafka topics:
`ztf_<YYYYMMDD>_programid<N>`, `pgir_<date>`, `winter_<date>`, `turbo_<date>`, `decam_<date>`,
and `lsst-alerts-v<major>` for Rubin, whose packets are produced Confluent-framed as Rubin sends
them (records of Avro container files are re-framed one per message with their schema id).

    python -m ingester.replay [FILE_OR_DIRECTORY ...] [--suffix _test]

produces the given `.avro` packets (default: the bundled alerts) to the Kafka that commands use
(KAFKA_BOOTSTRAP_SERVERS, else the running `up --local` instance, else the configured one)."""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import fastavro
from confluent_kafka import Producer
from tqdm import tqdm

from ingester.decode import MAGIC, decode_for, frame_confluent
from ingester.registry_client import registry_for, schema_id_of
from ingester.shapes import split
from kowalski.config import ROOT, Config
from kowalski.surveys import SURVEYS, Survey, UnknownSurvey, bundled_packets, survey_of_path


def topic_for(packet: bytes, survey: Survey, suffix: str = "") -> str:
    """The topic a packet belongs to, from its own alert (night of jd, programid, version)."""
    schemas = (
        registry_for(None, ROOT / "data" / survey.schema_folder) if survey.schema_folder else None
    )
    record = decode_for(survey, packet, schemas)[0]
    return survey.topic(split(survey, record).alert) + suffix


def messages_of(packet: bytes, survey: Survey) -> list[bytes]:
    """What the survey's stream carries for a packet file: the bytes unchanged, or for a
    Confluent-framed survey each record of a container file framed with its schema id."""
    if survey.framing != "confluent" or packet[:4] != MAGIC:
        return [packet]
    reader = fastavro.reader(io.BytesIO(packet))
    schema = reader.writer_schema
    assert isinstance(schema, dict)  # an alert container's schema is a record
    schema_id = schema_id_of(f"{schema.get('namespace')}.{schema['name']}")
    parsed = fastavro.parse_schema(schema)
    # fastavro types each datum as any Avro value: those of a record schema are dicts
    return [frame_confluent(schema_id, cast(dict[str, Any], r), parsed) for r in reader]


def alert_files(paths: Iterable[Path]) -> list[Path]:
    """The `.avro` files among `paths`, directories searched recursively."""
    found: list[Path] = []
    for path in paths:
        found += sorted(path.rglob("*.avro")) if path.is_dir() else [path]
    return found


def replay(
    bootstrap_servers: str,
    files: Iterable[Path],
    suffix: str = "",
    progress: bool = True,
    survey: Survey | None = None,
) -> dict[str, int]:
    """Produce every file's messages (see messages_of); returns messages per topic. The survey of
    each file is `survey`, else the one whose data folder it lies in."""
    producer = Producer({"bootstrap.servers": bootstrap_servers, "message.max.bytes": 10_485_760})
    counts: dict[str, int] = {}
    paths = sorted(files)
    for path in tqdm(paths, desc="replaying alerts", unit="alert", disable=not progress):
        of = survey or survey_of_path(path)
        for message in messages_of(path.read_bytes(), of):
            topic = topic_for(message, of, suffix)
            producer.produce(topic, message)
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
            models = {name: load_models(cfg, name) for name in by_survey}
            pipeline = Pipeline(cfg, client[cfg.database.db], models)
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


def main(argv: list[str] | None = None) -> int:
    from kowalski.config import load_config_or_exit
    from kowalski.connectivity import one_line_errors, require_kafka

    parser = argparse.ArgumentParser(prog="python -m ingester.replay", description=__doc__)
    parser.add_argument("paths", nargs="*", type=Path, help="alert files or directories")
    parser.add_argument("--suffix", default="", help="appended to every topic name")
    args = parser.parse_args(argv)
    files = alert_files(args.paths) if args.paths else bundled_packets(ROOT / "data")
    missing = [str(p) for p in files if not p.is_file()]
    if missing or not files:
        problem = f"no such file: {', '.join(missing)}" if missing else "no .avro files found"
        print(f"error: {problem}", file=sys.stderr)
        return 1
    cfg = load_config_or_exit()
    with one_line_errors(cfg):
        require_kafka(cfg)
        try:
            counts = replay(cfg.kafka.bootstrap_servers, files, args.suffix)
        except (RuntimeError, UnknownSurvey) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(
        f"replayed {sum(counts.values())} alerts to {len(counts)} topics at {cfg.kafka.bootstrap_servers}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
