"""What every benchmark of the night shares: the servers up and the night prepared (built,
SYNTHETIC catalogs, filters and history loaded), its description, and figures summarized as median
and range."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lsstnight import LSST, build_lsst_night, lsst_filter_pipelines, lsst_history
from bench.night import Services, bench_environ, night_workdir, services
from bench.nightdata import (
    FILTER_COUNT,
    Night,
    NightSpec,
    build_night,
    history_documents,
    load_catalogs,
    load_filters,
)
from kowalski.config import Config, build_config

Doc = dict[str, Any]


@dataclass
class Prepared:
    """Servers up, the night built, catalogs, filters and history loaded."""

    svc: Services
    env: dict[str, str]
    cfg: Config
    night: Night
    history: list[Doc]
    catalogs: dict[str, int]
    workdir: Path


@contextmanager
def prepared(args: argparse.Namespace) -> Iterator[Prepared]:
    spec = NightSpec(
        alerts=args.night,
        catalog_rows=args.catalog_rows,
        history_fraction=args.history,
        seed=args.seed,
    )
    workdir = night_workdir()
    try:
        with services(workdir) as svc:
            env = bench_environ(svc, args.database)
            cfg = build_config([], env)
            print(
                f"building a {args.survey.upper()} night of {spec.alerts} alerts from the real "
                "packets ...",
                flush=True,
            )
            lsst = args.survey == "lsst"
            night = build_lsst_night(cfg, spec) if lsst else build_night(spec)
            print("loading SYNTHETIC catalogs, filters and history ...", flush=True)
            catalogs = load_catalogs(cfg, night)
            if lsst:
                load_filters(cfg, FILTER_COUNT, LSST, lsst_filter_pipelines())
                history = lsst_history(cfg, night)
            else:
                load_filters(cfg)
                history = history_documents(cfg, night)
            yield Prepared(svc, env, cfg, night, history, catalogs, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def describe(args: argparse.Namespace, ready: Prepared) -> Doc:
    source = {
        "ZTF": "copies of the 38 real ZTF packets in data/ztf_alerts",
        "LSST": f"copies of the {len(ready.night.fields)} real Rubin packets in data/lsst_alerts",
    }[ready.night.survey]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "database": ready.svc.database,
            "kafka": "local" if "kafka" in ready.svc.pids else "KAFKA_BOOTSTRAP_SERVERS",
        },
        "night": {
            "survey": ready.night.survey,
            "alerts": len(ready.night.alerts),
            "objects": len(ready.night.objects),
            "objects_with_history": len(ready.history),
            "source": f"{source} (new ids, jittered positions and times)",
            "synthetic_catalogs": ready.catalogs,
            "filters": FILTER_COUNT,
            "produce_rate": args.rate or "all at once",
        },
    }


def spread(values: list[Any]) -> Doc | None:
    """Median and range of the measured values (None where no run measured it)."""
    measured = [v for v in values if v is not None]
    if not measured:
        return None
    return {"median": statistics.median(measured), "min": min(measured), "max": max(measured)}


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def cell(item: Doc | None, digits: int) -> str:
    """`median (min-max)`; the median alone when the runs agree or there is one."""
    if item is None:
        return "-"
    median = fmt(item["median"], digits)
    if item["min"] == item["max"]:
        return median
    return f"{median} ({fmt(item['min'], digits)}-{fmt(item['max'], digits)})"
