"""The scale-out benchmark: `./kowalski.py bench --ingesters N --workers M`.

The night (bench/nightdata.py) runs as a multi-host deployment runs it, here on one machine with
separate OS processes: a `dask scheduler`, `dask worker`s (kowalski/testing/dask.py
`ExternalCluster`) and N ingester processes (`python -m ingester`, joined to the scheduler by
`dask.scheduler_address`) in one consumer group over topics of max(--partitions, N) partitions.

Each repetition runs the night with 1 worker, then with M (same machine, same run, the archive
reset in between): alerts/s end to end = alerts / (first alert handed to Kafka -> every offset of
the group committed, i.e. every alert stored and filtered). The scaling ratio is M workers'
alerts/s over 1 worker's, within one repetition. CPU seconds per alert of each role (ingesters,
dask workers, the scheduler, the database and Kafka when they are ours) come with every run: the
per-worker figures that size a deployment.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.night import produce, write_night
from bench.nightdata import reset_archive
from bench.prepared import Prepared, cell, spread
from kowalski.config import ROOT, Config
from kowalski.db import sync_client
from kowalski.services.dask import ExternalCluster
from kowalski.services.kafka import create_topics, members_assigned, offsets_behind
from kowalski.services.process import start_process, stop_process
from kowalski.surveys import SURVEYS, Survey

Doc = dict[str, Any]
DEADLINE_S = 1800.0
RATIO = "scaling ratio"


def worker_counts(workers: int) -> list[int]:
    """1 worker, then `workers` (the baseline alone when that is 1)."""
    return sorted({1, workers})


def ingester_environ(
    env: dict[str, str], survey: Survey, suffix: str, group: str, batch_size: int, scheduler: str
) -> dict[str, str]:
    """The ingester processes' environment: the run's topics and group, the external scheduler."""
    return {
        **env,
        f"KOWALSKI__kafka__topics__{survey.name}": f"{survey.topic_pattern}{suffix}$",
        "KOWALSKI__kafka__group": group,
        "KOWALSKI__ingester__batch_size": str(batch_size),
        "KOWALSKI__dask__scheduler_address": scheduler,
        "KOWALSKI__backfill__in_ingester": "false",  # alerts only: no backfill jobs polled
        "PYTHONPATH": str(ROOT),
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes and their children (a `dask worker` is a nanny
    and its worker process)."""
    import psutil  # type: ignore[import-untyped]  # psutil ships no type stubs

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total


def wait_for(
    condition: Callable[[], bool], what: str, procs: list[subprocess.Popen[bytes]], logs: Path
) -> None:
    """Poll `condition` until true; fail at the deadline, or at once when an ingester exited."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        dead = [str(p.args) for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"an ingester exited while waiting for {what}: logs in {logs}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {DEADLINE_S:.0f} s (logs in {logs})")
        time.sleep(0.2)


def archived(cfg: Config, survey: Survey) -> int:
    with sync_client(cfg) as client:
        return client[cfg.database.db][survey.alerts_collection(cfg)].count_documents({})


def run_scaled(ready: Prepared, args: argparse.Namespace, workers: int, label: str) -> Doc:
    """One pass of the night through `args.ingesters` ingester processes and `workers` dask
    workers (a scheduler and workers of its own, stopped at the end)."""
    night, svc = ready.night, ready.svc
    survey = SURVEYS[night.survey]
    reset_archive(ready.cfg, ready.history, survey)
    suffix = f"_{label}_{os.getpid()}_{int(time.time())}"
    topics = [t + suffix for t in night.topics]
    partitions = max(args.partitions, args.ingesters)
    create_topics(svc.bootstrap, topics, partitions)
    group = f"bench{suffix}"
    logs = ready.workdir / label
    night_file = ready.workdir / "scaling.night"
    times_file = logs / "times.json"
    with ExternalCluster(logs, ready.env) as cluster:
        cluster.start(workers)
        env = ingester_environ(ready.env, survey, suffix, group, args.batch_size, cluster.address)
        ingesters: list[subprocess.Popen[bytes]] = []
        try:
            for n in range(args.ingesters):
                ingesters.append(
                    start_process(
                        [sys.executable, "-m", "ingester", "--survey", survey.name],
                        logs / f"ingester-{n}.log",
                        cwd=ROOT,
                        env=env,
                    )
                )
            wait_for(
                lambda: members_assigned(svc.bootstrap, group, args.ingesters),
                f"{args.ingesters} ingester(s) holding partitions",
                ingesters,
                logs,
            )
            roles = {
                "ingesters": [p.pid for p in ingesters],
                "dask workers": [p.pid for p in cluster.workers],
                "dask scheduler": [cluster.scheduler.pid] if cluster.scheduler else [],
                **{role: [pid] for role, pid in svc.pids.items()},
            }
            before = {role: cpu_seconds(pids) for role, pids in roles.items()}
            producer = multiprocessing.get_context("spawn").Process(
                target=produce,
                args=(svc.bootstrap, str(night_file), suffix, 0.0, str(times_file), partitions),
                daemon=True,
            )
            producer.start()
            producer.join(timeout=DEADLINE_S)
            if producer.exitcode != 0:
                raise RuntimeError(f"the producer failed (exit status {producer.exitcode})")
            wait_for(
                lambda: not offsets_behind(svc.bootstrap, group, topics),
                "every offset committed",
                ingesters,
                logs,
            )
            done = time.time()
            after = {role: cpu_seconds(pids) for role, pids in roles.items()}
        finally:
            for proc in ingesters:
                stop_process(proc, timeout=120)
    stored = archived(ready.cfg, survey)
    if stored != len(night.alerts):  # a wrong count is an error, never a figure
        raise RuntimeError(f"{label}: {stored} of {len(night.alerts)} alerts archived")
    produced = json.loads(times_file.read_text())
    wall = done - min(produced.values())
    return {
        "workers": workers,
        "ingesters": args.ingesters,
        "partitions": partitions,
        "alerts": stored,
        "wall_s": wall,
        "alerts_per_s": stored / wall,
        "cpu_ms_per_alert": {role: (after[role] - before[role]) * 1e3 / stored for role in roles},
    }


def ratio(baseline: Doc, scaled: Doc) -> float:
    return float(scaled["alerts_per_s"]) / float(baseline["alerts_per_s"])


def scaling_bench(args: argparse.Namespace, ready: Prepared) -> Doc:
    """Every repetition: the night with 1 worker, then with `args.workers` (runs, their
    summaries and the ratio)."""
    write_night(ready.night, ready.workdir / "scaling.night")
    counts = worker_counts(args.workers)
    runs: dict[int, list[Doc]] = {w: [] for w in counts}
    for number in range(1, args.repeat + 1):
        for workers in counts:
            print(
                f"run {number}/{args.repeat}: {len(ready.night.alerts)} alerts, "
                f"{args.ingesters} ingester process(es), {workers} dask worker(s) ...",
                flush=True,
            )
            runs[workers].append(run_scaled(ready, args, workers, f"w{workers}r{number}"))
    results: Doc = {
        "repeat": args.repeat,
        "ingesters": args.ingesters,
        "workers": {
            str(w): {
                "runs": done,
                "alerts/s": spread([r["alerts_per_s"] for r in done]),
                "cpu_ms_per_alert": {
                    role: spread([r["cpu_ms_per_alert"][role] for r in done])
                    for role in done[0]["cpu_ms_per_alert"]
                },
            }
            for w, done in runs.items()
        },
    }
    if len(counts) == 2:
        pairs = zip(runs[1], runs[counts[1]], strict=True)
        results[RATIO] = spread([ratio(one, many) for one, many in pairs])
    return results


def scaling_table(results: Doc) -> str:
    night = results["night"]
    lines = [
        f"{night['survey']} night: {night['alerts']} alerts, {night['filters']} filters, "
        f"{results['ingesters']} ingester process(es) in one consumer group, external dask "
        f"scheduler; {results['machine']['cpus']} CPUs; median (min-max) of "
        f"{results['repeat']} run(s)",
    ]
    for workers, item in results["workers"].items():
        cpu = ", ".join(
            f"{role} {cell(value, 1)}" for role, value in item["cpu_ms_per_alert"].items()
        )
        lines.append(f"{workers} dask worker(s): {cell(item['alerts/s'], 1)} alerts/s end to end")
        lines.append(f"  CPU ms/alert: {cpu}")
    if RATIO in results:
        workers = list(results["workers"])
        lines.append(
            f"{RATIO} ({workers[1]} workers / 1 worker, alerts/s): {cell(results[RATIO], 2)}x"
        )
    return "\n".join(lines)
