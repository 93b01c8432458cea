"""CPU profile of the ingestion path: `./kowalski.py bench --profile [--night N]`.

Runs the benchmark night through `Pipeline.process` in this process (the code a dask worker runs,
without Kafka and dask around it) under cProfile with a CPU-time clock (waiting for the database
costs nothing there), after one warm-up batch; prints the functions that take the most CPU (own time
and cumulative) and writes the stats for `python -m pstats` or snakeviz. Also printed: wall and CPU
ms per alert, `BatchReport.seconds` per stage (wall), and the ML stage run alone on the same alerts
(wall and CPU), to tell a slow stage from one that waits for a core.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import time
from pathlib import Path
from typing import Any

from bench.nightdata import ZTF, Night
from ingester import ml
from ingester.decode import decode_packet
from ingester.ml import load_models
from ingester.pipeline import BatchReport, Packet, Pipeline
from kowalski.config import Config
from kowalski.db import async_client

Doc = dict[str, Any]
TOP = 30


async def process_night(
    cfg: Config, night: Night, batch_size: int, profiler: cProfile.Profile
) -> Doc:
    client = async_client(cfg)
    try:
        pipeline = Pipeline(cfg, client[cfg.database.db], {ZTF.name: load_models(cfg, ZTF.name)})
        packets = [Packet("bench", 0, i, a.packet) for i, a in enumerate(night.alerts)]
        # the first batch warms up (model sessions, caches, filter templates): not profiled
        report = BatchReport()
        wall = cpu = 0.0
        for start in range(0, len(packets), batch_size):
            batch = packets[start : start + batch_size]
            begin_wall, begin_cpu = time.perf_counter(), time.process_time()
            if start:
                profiler.enable()
            report.add(await pipeline.process(ZTF, batch))
            profiler.disable()
            if start:
                wall += time.perf_counter() - begin_wall
                cpu += time.process_time() - begin_cpu
        profiled = max(len(packets) - batch_size, 1)
        records = [decode_packet(p.value)[0] for p in packets[batch_size:]]
        models = pipeline.models[ZTF.name]
        begin_wall, begin_cpu = time.perf_counter(), time.process_time()
        ml.score_alerts(models, records, cfg.ml.batch_size)
        ml_wall, ml_cpu = time.perf_counter() - begin_wall, time.process_time() - begin_cpu
        return {
            "ml_alone_wall_ms_per_alert": ml_wall * 1e3 / max(len(records), 1),
            "ml_alone_cpu_ms_per_alert": ml_cpu * 1e3 / max(len(records), 1),
            "alerts_profiled": profiled,
            "wall_ms_per_alert": wall * 1e3 / profiled,
            "cpu_ms_per_alert": cpu * 1e3 / profiled,
            "stage_ms_per_alert": {k: v * 1e3 / len(packets) for k, v in report.seconds.items()},
        }
    finally:
        await client.close()


def top(stats: pstats.Stats, key: str) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(key).print_stats(TOP)
    return out.getvalue()


def run_profile(cfg: Config, night: Night, batch_size: int, out: Path) -> Doc:
    profiler = cProfile.Profile(time.process_time)
    summary = asyncio.run(process_night(cfg, night, batch_size, profiler))
    out.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(out))
    stats = pstats.Stats(profiler)
    stats.strip_dirs()
    print(top(stats, "tottime"))
    print(top(stats, "cumulative"))
    print(f"profile written to {out} (python -m pstats {out})")
    return summary
