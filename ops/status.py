"""`./kowalski.py status`: one screen for a running instance, from its endpoints: the API's and the
ingester's readiness, and from the ingester's `/metrics`: per survey the rate over the last minute,
alerts consumed, archived, skipped as duplicates and dead-lettered, filter passes and failures; the Kafka lag; the
SkyPortal outbox; the results stream; the dask workers."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kowalski.config import Config
from kowalski.health import ingester_url, local_host

TIMEOUT_S = 5.0
Samples = dict[str, list[tuple[dict[str, str], float]]]


def fetch(url: str) -> tuple[int, str]:
    """(HTTP status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def samples(text: str) -> Samples:
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), float(sample.value)))
    return out


def by_survey(found: Samples, name: str) -> dict[str, float]:
    """`name`'s samples summed per survey (over its other labels, e.g. filter_id)."""
    out: dict[str, float] = defaultdict(float)
    for labels, value in found.get(name, []):
        out[labels.get("survey", "")] += value
    return dict(out)


def readiness(name: str, url: str) -> str:
    status, body = fetch(url)
    if status == 200:
        return f"{name}: ready ({url})"
    if status == 0:
        return f"{name}: NOT ANSWERING ({url}: {body})"
    try:
        detail: Any = json.loads(body)
    except ValueError:
        detail = body.strip()
    return f"{name}: NOT READY ({url}: HTTP {status}: {detail})"


def report(cfg: Config) -> str:
    api = f"http://{local_host(cfg.server.host)}:{cfg.server.port}"
    ingester = ingester_url(cfg)
    lines = [readiness("API", f"{api}/readyz"), readiness("ingester", f"{ingester}/readyz")]
    status, text = fetch(f"{ingester}/metrics")
    if status != 200:
        lines.append(f"ingester metrics: unavailable ({ingester}/metrics: {status or text})")
        return "\n".join(lines)
    found = samples(text)
    columns = {
        "alerts/s (1 min)": "kowalski_alerts_per_second",
        "consumed": "kowalski_alerts_consumed_total",
        "archived": "kowalski_alerts_archived_total",
        "duplicates": "kowalski_alerts_duplicate_total",
        "dead-lettered": "kowalski_alerts_dead_lettered_total",
        "passes": "kowalski_filter_passes_total",
        "filter failures": "kowalski_filter_failures_total",
        "ML failures": "kowalski_ml_failures_total",
        "xmatch failures": "kowalski_xmatch_failures_total",
    }
    values = {title: by_survey(found, name) for title, name in columns.items()}
    surveys = sorted({s for column in values.values() for s in column if s})
    lines.append("")
    lines.append(f"{'survey':<8}" + "".join(f"{title:>18}" for title in columns))
    for survey in surveys:
        cells = [values[title].get(survey, 0.0) for title in columns]
        lines.append(
            f"{survey:<8}" + f"{cells[0]:>18.2f}" + "".join(f"{int(v):>18d}" for v in cells[1:])
        )
    if not surveys:
        lines.append("(no alerts consumed yet)")
    lag = found.get("kowalski_kafka_consumer_lag", [])
    total = int(sum(v for _, v in lag))
    worst = sorted(lag, key=lambda item: -item[1])[:5]
    detail = ", ".join(f"{lb['topic']}[{lb['partition']}]: {int(v)}" for lb, v in worst if v)
    lines.append("")
    lines.append(f"Kafka lag: {total} message(s)" + (f" ({detail})" if detail else ""))
    pending = by_survey(found, "kowalski_skyportal_outbox_pending")
    oldest = by_survey(found, "kowalski_skyportal_outbox_oldest_seconds")
    if pending:
        waiting = ", ".join(
            f"{s} {int(n)} (oldest {oldest.get(s, 0):.0f} s)" for s, n in sorted(pending.items())
        )
        lines.append(f"SkyPortal outbox waiting: {waiting}")
    elif cfg.misc.broker:
        lines.append("SkyPortal outbox waiting: none")
    outcomes = {
        lb["outcome"]: int(v) for lb, v in found.get("kowalski_results_transactions_total", [])
    }
    lines.append(
        f"results stream: {outcomes.get('committed', 0)} batch(es) committed, "
        f"{outcomes.get('aborted', 0)} aborted"
    )
    workers = found.get("kowalski_dask_workers", [])
    if workers:
        lines.append(f"dask workers alive: {int(workers[0][1])}")
    return "\n".join(lines)


def main(cfg: Config) -> int:
    text = report(cfg)
    print(text)
    return 0 if "NOT " not in text and "unavailable" not in text else 1


if __name__ == "__main__":
    from kowalski.config import load_config_or_exit

    sys.exit(main(load_config_or_exit()))
