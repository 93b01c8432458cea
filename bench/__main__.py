"""Benchmarks: `./kowalski.py bench [--night N] [--out FILE]` (the night benchmark, default),
`./kowalski.py bench --survey lsst` (the same with a Rubin night, bench/lsstnight.py),
`./kowalski.py bench --micro` (micro benchmarks of single stages, bench/micro.py),
`./kowalski.py bench --profile` (cProfile of the pipeline over the night, bench/profile.py),
`./kowalski.py bench --ingesters N --workers M` (scale-out: N ingester processes and an external dask
scheduler with 1, then M, worker processes; the scaling ratio; bench/scaling.py).

The night benchmark builds a night of N alerts from the real packets in data/ (copies with new
ids, jittered positions and times; bench/nightdata.py), SYNTHETIC cross-match catalogs, 25 filters
and preloaded history, and runs it through real Kafka and the ingester in three modes: batched;
the batched pipeline one alert at a time (batches of 1); upstream's way (bench/upstream.py: alert by
alert, each filter its own aggregation, the history `$addToSet`). Each mode runs --repeat times
(interleaved); the table shows each figure's median and range (min-max), and the ratios of
alerts/s within each repetition. Then (ZTF) the API is loaded with concurrent penquins-style
queries (bench/api_load.py). It prints a table and writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.api_load import run_api
from bench.backfill import backfill_line, run_backfill
from bench.dashboard import Sampler, render
from bench.micro import run_micro
from bench.night import run_mode, write_night
from bench.nightdata import REAL_DENSITY, ZTF, Night, reset_archive
from bench.prepared import cell, describe, fmt, prepared, spread
from bench.profile import run_profile
from bench.scaling import scaling_bench, scaling_table
from kowalski.config import CONFIGURED, ROOT, build_config, user_files
from kowalski.connectivity import one_line_errors, require_database
from kowalski.surveys import SURVEYS

Doc = dict[str, Any]
REPEAT = 3
# per survey: (alerts in the night, the first N one at a time, the first N upstream's way), so that
# a default run of both nights takes ~20 min on 2 cores. Upstream's way costs ~0.7 s per alert and
# its alerts/s is flat over a night, so its first 60 alerts give a stable ratio.
NIGHT_DEFAULTS = {"ztf": (2000, 100, 60), "lsst": (500, 50, 10)}
SCALING_NIGHT_ALERTS, SCALING_REPEAT = 400, 1  # a few minutes on a 2-core machine
BATCHED, SINGLE, UPSTREAM = "batched", "one_at_a_time", "upstream_way"
UPSTREAM_RATIO = f"{BATCHED} / {UPSTREAM}"
SINGLE_RATIO = f"{BATCHED} / {SINGLE}"
# (survey, name, result path to a median, goal, "max" or "min") from issue 23, on the 2-core machine
TARGETS = (
    (
        "ZTF",
        "database server CPU ms/alert (batched)",
        ("modes", BATCHED, "summary", "database server CPU ms/alert", "median"),
        20.0,
        "max",
    ),
    (
        "ZTF",
        "client CPU ms/alert (batched)",
        ("modes", BATCHED, "summary", "client CPU ms/alert", "median"),
        15.0,
        "max",
    ),
    (
        "ZTF",
        "alerts/s end to end (batched, 25 filters)",
        ("modes", BATCHED, "summary", "alerts/s end to end", "median"),
        45.0,
        "min",
    ),
    ("ZTF", "batched / upstream's way, alerts/s", ("ratios", UPSTREAM_RATIO, "median"), 5.0, "min"),
    (
        "LSST",
        "LSST night alerts/s end to end (batched)",
        ("modes", BATCHED, "summary", "alerts/s end to end", "median"),
        30.0,
        "min",
    ),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kowalski.py bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--night",
        type=int,
        default=None,
        help="alerts in the night (default: ZTF "
        f"{NIGHT_DEFAULTS['ztf'][0]}, LSST {NIGHT_DEFAULTS['lsst'][0]}; --ingesters: "
        f"{SCALING_NIGHT_ALERTS})",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="ingester batch size")
    parser.add_argument(
        "--single",
        type=int,
        default=None,
        help="the night's first N alerts run one at a time too (0: skip that mode; the ratio "
        f"compares alerts/s; default: ZTF {NIGHT_DEFAULTS['ztf'][1]}, LSST "
        f"{NIGHT_DEFAULTS['lsst'][1]})",
    )
    parser.add_argument(
        "--upstream",
        type=int,
        default=None,
        help="the night's first N alerts run upstream's way too (bench/upstream.py; 0: skip; "
        f"default: ZTF {NIGHT_DEFAULTS['ztf'][2]}, LSST {NIGHT_DEFAULTS['lsst'][2]})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"runs of each mode (median and range reported; default {REPEAT}, --ingesters: "
        f"{SCALING_REPEAT})",
    )
    parser.add_argument(
        "--survey", choices=["ztf", "lsst"], default="ztf", help="whose real packets make the night"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="dask worker processes (--ingesters: the scaled run's, the baseline has 1)",
    )
    parser.add_argument(
        "--ingesters",
        type=int,
        default=0,
        help="scale-out mode: N ingester processes in one consumer group, an external dask "
        "scheduler, the night with 1 worker then --workers; prints both rates and the scaling "
        "ratio (0: the night benchmark)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=4,
        help="--ingesters: partitions per topic (at least the number of ingesters)",
    )
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
    parser.add_argument(
        "--backfill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the night: alerts/s of one back-fill job over the archive (default on)",
    )
    parser.add_argument(
        "--dashboard",
        type=Path,
        default=None,
        help="render the metrics dashboard's panels of the first run to this PNG",
    )
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
    args = parser.parse_args(argv)
    scaling = args.ingesters > 0
    night, single, upstream = NIGHT_DEFAULTS[args.survey]
    if args.night is None:
        args.night = SCALING_NIGHT_ALERTS if scaling else night
    args.single = single if args.single is None else args.single
    args.upstream = upstream if args.upstream is None else args.upstream
    if args.repeat is None:
        args.repeat = SCALING_REPEAT if scaling else REPEAT
    return args


def subset(night: Night, count: int) -> Night:
    return Night(night.spec, night.alerts[:count], night.objects, night.survey, night.fields)


def mode_plan(args: argparse.Namespace, night: Night) -> list[tuple[str, int, Night, bool]]:
    """(label, batch size, alerts, upstream's way) of each mode the arguments ask for."""
    modes = [(BATCHED, args.batch_size, night, False)]
    for label, count, upstream in ((SINGLE, args.single, False), (UPSTREAM, args.upstream, True)):
        if count > 0:
            modes.append((label, 1, subset(night, min(count, len(night.alerts))), upstream))
    return modes


def night_bench(args: argparse.Namespace) -> Doc:
    with prepared(args) as ready:
        results: Doc = {**describe(args, ready), "repeat": args.repeat, "modes": {}}
        night = ready.night
        survey = SURVEYS[night.survey]
        plan = mode_plan(args, night)
        for label, size, part, upstream in plan:
            write_night(part, ready.workdir / f"{label}.night")
            results["modes"][label] = {"batch_size": size, "upstream_way": upstream, "runs": []}
        # modes interleaved (a slow spell hits them all), the batched one last in each repetition
        # so that the archive left for the back-fill and the API is the whole night's
        for number in range(1, args.repeat + 1):
            for label, size, part, upstream in plan[1:] + plan[:1]:
                print(
                    f"run {number}/{args.repeat}, {label}: {len(part.alerts)} alerts through "
                    "Kafka + ingester ...",
                    flush=True,
                )
                reset_archive(ready.cfg, ready.history, survey)
                watch = (
                    args.dashboard is not None
                    and number == 1
                    and (label, upstream)
                    == (
                        plan[0][0],
                        plan[0][3],
                    )
                )
                with Sampler() as sampler:
                    results["modes"][label]["runs"].append(
                        run_mode(
                            ready.env,
                            ready.svc,
                            part,
                            ready.workdir / f"{label}.night",
                            f"{label}{number}",
                            size,
                            args.workers,
                            args.rate,
                            upstream,
                        )
                    )
                if watch:
                    title = f"Kowalski: {len(part.alerts)} {night.survey} alerts, {label} (bench)"
                    print(f"dashboard: {render(sampler.samples, args.dashboard, title)}")
        summarize(results)
        if args.backfill:
            print("back-fill: one job over the archive the night left ...", flush=True)
            results["backfill"] = run_backfill(ready.cfg, survey)
        if args.api_requests and night.survey == ZTF.name:
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
        reset_archive(ready.cfg, ready.history, SURVEYS[ready.night.survey])
        print(f"profiling {len(ready.night.alerts)} alerts in batches of {args.batch_size} ...")
        summary = run_profile(ready.cfg, ready.night, args.batch_size, out)
        return {**describe(args, ready), "profile": summary}


Figure = tuple[str, Callable[[Doc], Any], int]  # (name, value of one run, digits shown)


def command_bytes(kind: str, run: Doc) -> Any:
    return sum(run["db_bytes_per_alert_by_command"].get(kind, {}).values()) or None


def stage_ms(stage: str, run: Doc) -> Any:
    return run["stage_ms_per_alert"].get(stage)


def server_ms(server: str, run: Doc) -> Any:
    return run["server_cpu_ms_per_alert"].get(server)


def figures(runs: list[Doc]) -> list[Figure]:
    """The table's figures, for runs of any mode (per-command and per-stage rows: their union)."""
    kinds = sorted({k for run in runs for k in run["db_bytes_per_alert_by_command"]})
    stages = list(dict.fromkeys(s for run in runs for s in run["stage_ms_per_alert"]))
    rows: list[Figure] = [
        ("alerts", lambda m: m["stored"], 0),
        ("alerts/s end to end", lambda m: m["alerts_per_s"], 1),
        ("client CPU ms/alert", lambda m: m["client_cpu_ms_per_alert"], 1),
        ("DB round trips/alert", lambda m: m["round_trips_per_alert"], 2),
        ("DB bytes sent/alert", lambda m: m["db_bytes_per_alert"]["sent"], 0),
        ("DB bytes received/alert", lambda m: m["db_bytes_per_alert"]["received"], 0),
    ]
    rows += [(f"  {k} bytes sent+recv/alert", partial(command_bytes, k), 0) for k in kinds]
    rows += [
        ("latency produce->archive p50 ms", lambda m: m["latency_ms"]["p50"], 0),
        ("latency produce->archive p99 ms", lambda m: m["latency_ms"]["p99"], 0),
    ]
    rows += [(f"  stage {s} ms/alert", partial(stage_ms, s), 1) for s in stages]
    rows.append(
        (
            "peak RSS MB (max process)",
            lambda m: max(p["peak_rss_mb"] for p in m["processes"].values()),
            0,
        )
    )
    rows += [(f"{s} server CPU ms/alert", partial(server_ms, s), 1) for s in ("database", "kafka")]
    rows.append(("passed filters", lambda m: m["passed_filters"], 0))
    # (filter, alert) pairs recorded failed after their retries: counted, never hidden
    rows.append(("filter failures", lambda m: m.get("filter_failures"), 0))
    rows.append(("filter retries", lambda m: m.get("filter_retries"), 0))
    return rows


def summarize(results: Doc) -> None:
    """Each mode's figures as median and range over its runs; the alerts/s ratios of batched to
    the other modes, one per repetition (runs of one repetition are next to each other in time)."""
    modes = results["modes"]
    rows = figures([run for mode in modes.values() for run in mode["runs"]])
    for mode in modes.values():
        mode["summary"] = {
            name: spread([value(r) for r in mode["runs"]]) for name, value, _ in rows
        }
    results["ratios"] = {}
    for label, name in ((UPSTREAM, UPSTREAM_RATIO), (SINGLE, SINGLE_RATIO)):
        if label in modes and BATCHED in modes:
            pairs = zip(modes[BATCHED]["runs"], modes[label]["runs"], strict=True)
            results["ratios"][name] = spread(
                [b["alerts_per_s"] / o["alerts_per_s"] for b, o in pairs if o["alerts_per_s"]]
            )


def lookup(results: Doc, path: tuple[str, ...]) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def targets(results: Doc) -> list[Doc]:
    out = []
    for survey, name, path, goal, kind in TARGETS:
        if survey != results["night"]["survey"]:
            continue
        value = lookup(results, path)
        met = None if value is None else (value <= goal if kind == "max" else value >= goal)
        out.append({"target": name, "goal": goal, "kind": kind, "value": value, "met": met})
    return out


def mode_title(label: str, mode: Doc) -> str:
    return f"{label} ({mode['batch_size']})"


CELL = 30


def catalogs_line(rows: dict[str, int]) -> str:
    """The night's SYNTHETIC catalogs: how many, their rows, and those at real sky density."""
    real = {name: n for name, n in rows.items() if name in REAL_DENSITY}
    others = [n for name, n in rows.items() if name not in REAL_DENSITY]
    line = f"{len(rows)} SYNTHETIC catalogs x {max(others, default=0):,} rows"
    if real:
        line += " (" + ", ".join(f"{name} {n:,} at real density" for name, n in real.items()) + ")"
    return line


def table(results: Doc) -> str:
    night, modes = results["night"], results["modes"]
    labels = list(modes)
    lines = [
        f"{night['survey']} night: {night['alerts']} alerts of {night['objects']} objects "
        f"({night['objects_with_history']} with history), "
        f"{catalogs_line(night['synthetic_catalogs'])}, "
        f"{night['filters']} filters; database: {results['machine']['database']}, "
        f"{results['machine']['cpus']} CPUs; median (min-max) of {results['repeat']} runs",
        "",
        f"{'':<34}" + "".join(f"{mode_title(k, modes[k]):>{CELL}}" for k in labels),
    ]
    rows = figures([run for mode in modes.values() for run in mode["runs"]])
    for name, _, digits in rows:
        cells = [cell(modes[k]["summary"].get(name), digits) for k in labels]
        lines.append(f"{name:<34}" + "".join(f"{c:>{CELL}}" for c in cells))
    for name, item in results["ratios"].items():
        lines.append(f"{name + ', alerts/s':<34}{cell(item, 1) + 'x':>{CELL}}")
    if results.get("backfill"):
        lines += ["", backfill_line(results["backfill"])]
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
    if args.profile and args.survey != "ztf":
        print("--profile runs the ZTF night only", file=sys.stderr)
        return 2
    if args.profile:
        summary = profile_bench(args, args.out or ROOT / "var" / "bench-night.pstats")
        print(json.dumps(summary["profile"], indent=2))
        return 0
    if args.ingesters:
        out = args.out or ROOT / "var" / "bench-scaling.json"
        with prepared(args) as ready:
            results = {**describe(args, ready), **scaling_bench(args, ready)}
        show = scaling_table
    else:
        out = args.out or ROOT / "var" / "bench-night.json"
        results = night_bench(args)
        show = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print(show(results))
    print(f"\nfull results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
