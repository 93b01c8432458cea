"""`bench --dashboard PNG`: the Grafana dashboard's panels (ops/metrics/grafana/dashboards/
kowalski.json), rendered with matplotlib from the metrics a night really produced: the bench's
ingester records them in this process, and a sampler reads this process's registry every half
second while the night runs (what Prometheus would scrape from `/metrics`)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY

Series = dict[str, list[tuple[float, float]]]
RUBIN_S = 60.0
WINDOW_S = 5.0  # as rate(...[5s]) would


def snapshot() -> dict[str, float]:
    """Every kowalski_ sample of this process, keyed `name{label=value,...}`."""
    out: dict[str, float] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("kowalski_"):
            continue
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = float(sample.value)
    return out


class Sampler:
    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - start, snapshot()))
            self.stop.wait(self.every_s)
        self.samples.append((time.monotonic() - start, snapshot()))


def _select(snap: dict[str, float], name: str, **labels: str) -> dict[str, float]:
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return {
        key: value
        for key, value in snap.items()
        if key.startswith(name + "{") and all(w in key for w in wanted)
    }


def _labels(key: str) -> dict[str, str]:
    inner = key[key.index("{") + 1 : -1]
    return dict(p.split("=", 1) for p in inner.split(",") if p)


def windowed(
    samples: list[tuple[float, dict[str, float]]],
) -> Iterator[tuple[float, float, dict[str, float], dict[str, float]]]:
    """(t0, t, snapshot at t0, snapshot at t), t0 about WINDOW_S before t: as Prometheus's
    `rate(...[window])` looks back."""
    start = 0
    for t, snap in samples:
        while samples[start][0] < t - WINDOW_S:
            start += 1
        if samples[start][0] < t:
            yield samples[start][0], t, samples[start][1], snap


def rates(samples: list[tuple[float, dict[str, float]]], name: str, by: str) -> Series:
    """Per-second increase of counter `name` over the last WINDOW_S, summed per value of label
    `by` (as `sum by (by) (rate(...))`)."""
    out: Series = defaultdict(list)
    for t0, t1, a, b in windowed(samples):
        per: dict[str, float] = defaultdict(float)
        for key, value in _select(b, name).items():
            per[_labels(key).get(by, "")] += (value - a.get(key, 0.0)) / (t1 - t0)
        for label, rate in per.items():
            out[label].append((t1, rate))
    return dict(out)


def means(
    samples: list[tuple[float, dict[str, float]]], name: str, by: str, **labels: str
) -> Series:
    """Mean of histogram `name` (its samples with `labels`) over the last WINDOW_S (Δsum /
    Δcount), per value of `by`."""
    out: Series = defaultdict(list)
    for _, t1, a, b in windowed(samples):
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        for key, total in _select(b, f"{name}_sum", **labels).items():
            count_key = key.replace(f"{name}_sum", f"{name}_count")
            label = _labels(key).get(by, "")
            sums[label] += total - a.get(key, 0.0)
            counts[label] += b.get(count_key, 0.0) - a.get(count_key, 0.0)
        for label, done in counts.items():
            if done > 0:
                out[label].append((t1, sums[label] / done))
    return dict(out)


def totals(samples: list[tuple[float, dict[str, float]]], name: str) -> list[tuple[float, float]]:
    return [(t, sum(_select(s, name).values())) for t, s in samples]


def render(samples: list[tuple[float, dict[str, float]]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(
        (t for t, snap in samples if sum(_select(snap, "kowalski_alerts_consumed_total").values())),
        0.0,
    )
    samples = [(t - first, snap) for t, snap in samples if t >= first - WINDOW_S]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    fig.suptitle(title)
    panels = [
        (
            "Alerts per second, per survey",
            rates(samples, "kowalski_alerts_consumed_total", "survey"),
            "alerts/s",
        ),
        (
            "Kafka consumer lag (all partitions)",
            {"lag": totals(samples, "kowalski_kafka_consumer_lag")},
            "messages",
        ),
        ("Stage time per batch (mean)", means(samples, "kowalski_stage_seconds", "stage"), "s"),
        (
            "End-to-end latency per alert (mean); Rubin's 60 s",
            means(samples, "kowalski_alert_latency_seconds", "survey", point="done"),
            "s",
        ),
        (
            "Filter passes per second",
            rates(samples, "kowalski_filter_passes_total", "survey"),
            "passes/s",
        ),
        (
            "Failures (cumulative)",
            {
                name.replace("kowalski_", "").replace("_total", ""): totals(samples, name)
                for name in (
                    "kowalski_alerts_dead_lettered_total",
                    "kowalski_filter_failures_total",
                    "kowalski_ml_failures_total",
                    "kowalski_xmatch_failures_total",
                    "kowalski_batch_retries_total",
                )
            },
            "count",
        ),
    ]
    for ax, (name, series, unit) in zip(axes.flat, panels, strict=True):
        for label, points in sorted(series.items()):
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label or name)
        if "Rubin" in name:
            ax.axhline(RUBIN_S, color="red", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("seconds since the first batch")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7, ncol=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
