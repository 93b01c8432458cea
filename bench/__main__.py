"""Benchmarks: `./kowalski.py bench [--night N] [--out FILE]` (the night benchmark, default),
`./kowalski.py bench --micro` (micro benchmarks of single stages, bench/micro.py),
`./kowalski.py bench --profile` (cProfile of the pipeline over the night, bench/profile.py).

The night benchmark builds a night of N alerts from the real ZTF packets in data/ (copies with new
ids, jittered positions and times; bench/nightdata.py), SYNTHETIC cross-match catalogs, 25 filters
and preloaded history, runs it through real Kafka and the ingester twice in the same run (batched,
then one alert at a time as upstream does), then loads the API with concurrent penquins-style
queries (bench/api_load.py). It prints a table and writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.api_load import run_api
from bench.micro import run_micro
from bench.night import Services, bench_environ, night_workdir, run_mode, services, write_night
from bench.nightdata import (
    FILTER_COUNT,
    Night,
    NightSpec,
    build_night,
    history_documents,
    load_catalogs,
    load_filters,
    reset_archive,
)
from bench.profile import run_profile
from kowalski.config import CONFIGURED, ROOT, Config, build_config, user_files
from kowalski.connectivity import one_line_errors, require_database

Doc = dict[str, Any]
TARGETS = (  # (name, result path, goal, "max" or "min") from issue #9
    (
        "DB round trips per alert (batched)",
        ("modes", "batched", "round_trips_per_alert"),
        0.1,
        "max",
    ),
    (
        "client CPU ms per alert (batched)",
        ("modes", "batched", "client_cpu_ms_per_alert"),
        10.0,
        "max",
    ),
    ("batched / one at a time, alerts/s", ("speedup",), 10.0, "min"),
    ("alerts/s end to end (batched)", ("modes", "batched", "alerts_per_s"), 100.0, "min"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kowalski.py bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--night", type=int, default=2000, help="alerts in the night")
    parser.add_argument("--batch-size", type=int, default=256, help="ingester batch size")
    parser.add_argument(
        "--single",
        type=int,
        default=250,
        help="the night's first N alerts run one at a time too (0: skip that mode; the ratio "
        "compares alerts/s)",
    )
    parser.add_argument("--workers", type=int, default=2, help="dask worker processes")
    parser.add_argument(
        "--catalog-rows", type=int, default=20000, help="rows per SYNTHETIC cross-match catalog"
    )
    parser.add_argument("--history", type=float, default=0.3, help="objects with history")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="produce at this many alerts/s (0: all at once)"
    )
    parser.add_argument("--api-requests", type=int, default=400, help="0: skip the API mode")
    parser.add_argument("--api-concurrency", type=int, default=8)
    parser.add_argument("--api-processes", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--database", default="kowalski_bench_night", help="database name (dropped and refilled)"
    )
    parser.add_argument("--micro", action="store_true", help="run the micro benchmarks instead")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the pipeline over the night in this process instead (--out: .pstats)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--micro: pipeline rounds")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    return parser.parse_args(argv)


def subset(night: Night, count: int) -> Night:
    return Night(night.spec, night.alerts[:count], night.objects)


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
            print(f"building a night of {spec.alerts} alerts from the real packets ...", flush=True)
            night = build_night(spec)
            print("loading SYNTHETIC catalogs, filters and history ...", flush=True)
            catalogs = load_catalogs(cfg, night)
            load_filters(cfg)
            history = history_documents(cfg, night)
            yield Prepared(svc, env, cfg, night, history, catalogs, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def describe(args: argparse.Namespace, ready: Prepared) -> Doc:
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "database": ready.svc.database,
            "kafka": "local" if "kafka" in ready.svc.pids else "KAFKA_BOOTSTRAP_SERVERS",
        },
        "night": {
            "alerts": len(ready.night.alerts),
            "objects": len(ready.night.objects),
            "objects_with_history": len(ready.history),
            "source": "copies of the 38 real ZTF packets in data/ztf_alerts "
            "(new candid/objectId, jittered positions and times)",
            "synthetic_catalogs": ready.catalogs,
            "filters": FILTER_COUNT,
            "produce_rate": args.rate or "all at once",
        },
    }


def night_bench(args: argparse.Namespace) -> Doc:
    with prepared(args) as ready:
        results: Doc = {**describe(args, ready), "modes": {}}
        night = ready.night
        single = min(args.single, len(night.alerts))
        modes = [("batched", args.batch_size, night)]
        if single > 0:
            modes.append(("one_at_a_time", 1, subset(night, single)))
        for label, size, part in modes:
            print(f"{label}: {len(part.alerts)} alerts through Kafka + ingester ...", flush=True)
            reset_archive(ready.cfg, ready.history)
            night_file = ready.workdir / f"{label}.night"
            write_night(part, night_file)
            results["modes"][label] = run_mode(
                ready.env, ready.svc, part, night_file, label, size, args.workers, args.rate
            )
        if "one_at_a_time" in results["modes"]:
            results["speedup"] = (
                results["modes"]["batched"]["alerts_per_s"]
                / results["modes"]["one_at_a_time"]["alerts_per_s"]
            )
        if args.api_requests:
            print("API: concurrent penquins-style queries ...", flush=True)
            results["api"] = run_api(
                ready.cfg,
                ready.env,
                night,
                ready.workdir,
                args.api_requests,
                args.api_concurrency,
                args.api_processes,
            )
    results["targets"] = targets(results)
    return results


def profile_bench(args: argparse.Namespace, out: Path) -> Doc:
    with prepared(args) as ready:
        reset_archive(ready.cfg, ready.history)
        print(f"profiling {len(ready.night.alerts)} alerts in batches of {args.batch_size} ...")
        summary = run_profile(ready.cfg, ready.night, args.batch_size, out)
        return {**describe(args, ready), "profile": summary}


def lookup(results: Doc, path: tuple[str, ...]) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def targets(results: Doc) -> list[Doc]:
    out = []
    for name, path, goal, kind in TARGETS:
        value = lookup(results, path)
        met = None if value is None else (value <= goal if kind == "max" else value >= goal)
        out.append({"target": name, "goal": goal, "kind": kind, "value": value, "met": met})
    return out


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def mode_title(label: str, mode: Doc) -> str:
    return f"{label} ({mode['batch_size']})"


def table(results: Doc) -> str:
    night, modes = results["night"], results["modes"]
    labels = list(modes)
    lines = [
        f"night: {night['alerts']} alerts of {night['objects']} objects "
        f"({night['objects_with_history']} with history), {len(night['synthetic_catalogs'])} "
        f"SYNTHETIC catalogs x {max(night['synthetic_catalogs'].values(), default=0):,} rows, "
        f"{night['filters']} filters; database: {results['machine']['database']}, "
        f"{results['machine']['cpus']} CPUs",
        "",
        f"{'':<34}" + "".join(f"{mode_title(k, modes[k]):>24}" for k in labels),
    ]

    def row(name: str, key: Any, digits: int = 1) -> None:
        values = [key(modes[k]) for k in labels]
        lines.append(f"{name:<34}" + "".join(f"{fmt(v, digits):>24}" for v in values))

    row("alerts", lambda m: m["stored"], 0)
    row("alerts/s end to end", lambda m: m["alerts_per_s"])
    row("client CPU ms/alert", lambda m: m["client_cpu_ms_per_alert"])
    row("DB round trips/alert", lambda m: m["round_trips_per_alert"], 2)
    row("latency produce->archive p50 ms", lambda m: m["latency_ms"]["p50"], 0)
    row("latency produce->archive p99 ms", lambda m: m["latency_ms"]["p99"], 0)
    stages = list(modes[labels[0]]["stage_ms_per_alert"]) if labels else []
    for stage in stages:
        row(f"  stage {stage} ms/alert", lambda m, s=stage: m["stage_ms_per_alert"].get(s))
    row(
        "peak RSS MB (max process)",
        lambda m: max(p["peak_rss_mb"] for p in m["processes"].values()),
        0,
    )
    for server in ("database", "kafka"):
        row(
            f"{server} server CPU ms/alert", lambda m, s=server: m["server_cpu_ms_per_alert"].get(s)
        )
    if "speedup" in results:
        lines.append(f"{'batched / one at a time':<34}{results['speedup']:>23.1f}x")
    api = results.get("api")
    if api:
        lines += [
            "",
            f"API ({api['api_processes']} gunicorn workers, {api['concurrency']} concurrent clients): "
            f"{api['requests_per_s']:.1f} requests/s, p50 {fmt(api['latency_ms']['p50'], 0)} ms, "
            f"p99 {fmt(api['latency_ms']['p99'], 0)} ms, errors {sum(api['errors'].values())}",
        ]
        for kind, item in api["by_query"].items():
            lines.append(
                f"  {kind:<20} n={item['count']:<5} p50 {fmt(item['p50'], 0):>6} ms"
                f"   p99 {fmt(item['p99'], 0):>6} ms"
            )
    lines.append("")
    for target in results["targets"]:
        sign = "<=" if target["kind"] == "max" else ">="
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(
            f"target {target['target']} {sign} {target['goal']:g}: "
            f"{fmt(target['value'], 2)} ({verdict})"
        )
    return "\n".join(lines)


def check_given_database() -> None:
    """A database given by MONGODB_URI (or a running `up --local`) must answer: one line and exit
    status 1 if not, before any work (without one, the benchmark starts an embedded server)."""
    cfg = build_config(user_files(), {**os.environ, "KOWALSKI__server__insecure_dev": "true"})
    if cfg.origin("database") != CONFIGURED["database"]:
        with one_line_errors(cfg):
            require_database(cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.micro:
        return run_micro(args.rounds, args.out or ROOT / "var" / "bench.json")
    check_given_database()
    if args.profile:
        summary = profile_bench(args, args.out or ROOT / "var" / "bench-night.pstats")
        print(json.dumps(summary["profile"], indent=2))
        return 0
    out = args.out or ROOT / "var" / "bench-night.json"
    results = night_bench(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\nfull results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
