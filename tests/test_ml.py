"""ML scores against the reference, per backend (the ingestion test covers the stored scores)."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest

from ingester.decode import decode_packet
from ingester.ml import load_models, score_batch
from kowalski.config import build_config

from .conftest import DATA

COLUMNS = {
    "braai": "braai_d6_m9",
    "acai_h": "acai_h",
    "acai_v": "acai_v",
    "acai_o": "acai_o",
    "acai_n": "acai_n",
    "acai_b": "acai_b",
    "bts": "bts_v1.0.1",
}
# the original Keras / SavedModel files (not bundled: see data/PROVENANCE.md)
ORIGINAL_MODELS = Path(
    os.environ.get("KOWALSKI_ORIGINAL_MODELS", DATA.parent.parent / "shared" / "data" / "models")
)


def check_backend(environ: dict[str, str]) -> None:
    cfg = build_config([], environ)
    models = load_models(cfg, "ZTF")
    assert [m.name for m in models] == list(COLUMNS)
    rows = list(csv.DictReader((DATA / "reference" / "ml_scores.csv").open()))
    alerts = [decode_packet((DATA / r["file"]).read_bytes())[0] for r in rows]
    for batch_size in (1, 16):
        scores = score_batch(models, alerts, batch_size)
        for row, score in zip(rows, scores, strict=True):
            for model, column in COLUMNS.items():
                assert score[model] == pytest.approx(float(row[column]), abs=1e-5), (
                    row["file"],
                    model,
                )


def test_onnx_backend_matches_reference() -> None:
    check_backend({})


@pytest.mark.skipif(
    importlib.util.find_spec("tf_keras") is None or not (ORIGINAL_MODELS / "braai").exists(),
    reason="TensorFlow backend: needs tensorflow + tf_keras and the original model files",
)
def test_tensorflow_backend_matches_reference() -> None:
    check_backend(
        {"KOWALSKI__ml__backend": "tensorflow", "KOWALSKI__ml__models_path": str(ORIGINAL_MODELS)}
    )


def test_a_broken_cutout_does_not_stop_the_batch() -> None:
    cfg = build_config([], {})
    models = load_models(cfg, "ZTF")
    alerts = [
        decode_packet(p.read_bytes())[0]
        for p in sorted((DATA / "ztf_alerts" / "20200202").glob("*.avro"))[:3]
    ]
    alerts[1] = {**alerts[1], "cutoutScience": {"stampData": b"not a fits file"}}
    scores = score_batch(models, alerts)
    assert scores[1] == {} and "braai" in scores[0] and "braai" in scores[2]
