"""Stage: ML scores (braai, ACAI x5, BTSbot) for a batch of alerts, one inference call per model.

Preprocessing follows Kowalski: the triplet is science/template/difference, each gunzipped, NaN->0,
divided by its L2 norm and padded to 63x63 with 1e-9; features come from `candidate` (`drb` falls
back to `rb`) plus history-derived BTSbot features. The default backend is ONNX Runtime; the
TensorFlow backend loads the original Keras files (needs `tensorflow` + `tf_keras`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kowalski.config import ML, Config, MLModel
from kowalski.fits import read_stamp

log = logging.getLogger("kowalski.ingester.ml")

STAMP = 63
TRIPLET_CHANNELS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def stamp_array(cutout: Any) -> np.ndarray:
    """One normalised 63x63 stamp from a stored/decoded cutout (dict with stampData, or bytes)."""
    raw: Any = cutout.get("stampData") if isinstance(cutout, dict) else cutout
    img = np.nan_to_num(np.asarray(read_stamp(bytes(raw)), dtype=np.float64))
    norm = np.linalg.norm(img)
    if norm > 0:
        img = img / norm
    if img.shape != (STAMP, STAMP):
        img = np.pad(
            img[:STAMP, :STAMP],
            [(0, max(0, STAMP - img.shape[0])), (0, max(0, STAMP - img.shape[1]))],
            mode="constant",
            constant_values=1e-9,
        )
    return img


def make_triplet(alert: dict[str, Any]) -> np.ndarray:
    return np.stack([stamp_array(alert[c]) for c in TRIPLET_CHANNELS], axis=-1).astype(np.float32)


def derived_features(
    candidate: dict[str, Any], history: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """BTSbot's history features from the alert's own light curve (prv_candidates + candidate)."""
    detections = [p for p in [*history, candidate] if p.get("magpsf") is not None]
    peakmag, maxmag, peak_jd = 30.0, 0.0, candidate["jd"]
    for point in detections:
        if point["magpsf"] < peakmag:
            peakmag, peak_jd = point["magpsf"], point["jd"]
        maxmag = max(maxmag, point["magpsf"])
    first_jd = min(
        [candidate.get("jdstarthist") or candidate["jd"], *(p["jd"] for p in detections)]
    )
    return {
        "peakmag_so_far": peakmag,
        "maxmag_so_far": maxmag,
        "days_since_peak": candidate["jd"] - peak_jd,
        "days_to_peak": peak_jd - first_jd,
        "age": candidate["jd"] - first_jd,
        "nnondet": (candidate.get("ncovhist") or 0) - (candidate.get("ndethist") or 0),
    }


def feature_row(alert: dict[str, Any], names: Sequence[str]) -> np.ndarray:
    candidate = dict(alert["candidate"])
    if candidate.get("drb") is None:
        candidate["drb"] = candidate.get("rb")
    candidate.update(derived_features(candidate, alert.get("prv_candidates") or []))
    row = []
    for name in names:
        value = candidate.get(name)
        row.append(math.nan if value is None else float(value))
    return np.asarray(row, dtype=np.float32)


class Runner(Protocol):
    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass
class Model:
    name: str
    spec: MLModel
    run: Runner
    feature_names: list[str]

    def inputs(self, triplets: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.spec.triplet:
            out["triplet"] = triplets
        if self.feature_names:
            out["features"] = features
        return out


def _onnx_runner(path: Path, spec: MLModel, settings: ML) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    by_rank = {len(i.shape): i.name for i in session.get_inputs()}

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {}
        for key, array in inputs.items():
            name = by_rank[4] if key == "triplet" else by_rank[2]
            feed[name] = array
        if len(feed) != len(input_names):
            raise ValueError(f"model expects inputs {input_names}, got {sorted(inputs)}")
        return np.asarray(session.run(None, feed)[0]).reshape(-1)

    return run


def _tensorflow_runner(path: Path, spec: MLModel, settings: ML) -> Runner:
    import os
    import tarfile
    import tempfile

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras  # type: ignore[import-not-found]

    if path.suffix == ".h5":
        model = tf_keras.models.load_model(str(path), compile=False)
    else:  # BTSbot SavedModel tarball
        target = Path(tempfile.mkdtemp(prefix="kowalski-model-"))
        with tarfile.open(path) as tar:
            tar.extractall(target, filter="data")
        saved = next(p.parent for p in target.rglob("saved_model.pb"))
        model = tf_keras.models.load_model(str(saved), compile=False)

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        ordered = [inputs[key] for key in spec.order if key in inputs]
        args = ordered[0] if len(ordered) == 1 else ordered
        return np.asarray(model(args, training=False)).reshape(-1)

    return run


def load_models(cfg: Config, instrument: str) -> list[Model]:
    """Load every configured model for `instrument`; a model that fails to load is logged and
    skipped (its scores are then absent), as upstream does."""
    models = []
    base = cfg.path(cfg.ml.models_path)
    for name, spec in cfg.ml.models_of(instrument).items():
        relative = spec.onnx if cfg.ml.backend == "onnx" else spec.h5
        if not relative:
            log.warning("model %s has no %s file configured; skipped", name, cfg.ml.backend)
            continue
        path = base / relative
        try:
            loader = _onnx_runner if cfg.ml.backend == "onnx" else _tensorflow_runner
            runner = loader(path, spec, cfg.ml)
        except Exception as exc:
            log.error("cannot load model %s from %s: %s", name, path, exc)
            continue
        names = spec.feature_names if isinstance(spec.feature_names, list) else []
        models.append(Model(name, spec, runner, list(names)))
    return models


@dataclass
class Scores:
    """`classifications` per alert ({model: score, model_version: version}; a score that could not
    be computed is absent, never 0) and `failures`: (model, alert) pairs left unscored by an error
    (an unreadable cutout, a model that fails or answers NaN)."""

    classifications: list[dict[str, Any]]
    failures: int = 0


def score_batch(
    models: Sequence[Model], alerts: Sequence[dict[str, Any]], batch_size: int = 16
) -> list[dict[str, Any]]:
    """`classifications` for each alert (see `score_alerts`)."""
    return score_alerts(models, alerts, batch_size).classifications


def _triplets(alerts: Sequence[dict[str, Any]]) -> tuple[list[int], np.ndarray | None]:
    """(indices of the alerts whose triplet could be built, their stacked triplets)."""
    usable: list[int] = []
    triplets: list[np.ndarray] = []
    for i, alert in enumerate(alerts):
        try:
            triplets.append(make_triplet(alert))
            usable.append(i)
        except Exception as exc:
            log.warning("alert %s: cannot build triplet: %s", alert.get("candid"), exc)
    return usable, (np.stack(triplets) if triplets else None)


def _run_model(
    model: Model, triplets: np.ndarray, alerts: Sequence[dict[str, Any]], batch_size: int
) -> np.ndarray:
    features = (
        np.stack([feature_row(a, model.feature_names) for a in alerts])
        if model.feature_names
        else np.zeros((len(alerts), 0), np.float32)
    )
    scores = np.concatenate(
        [
            model.run(model.inputs(triplets[i : i + batch_size], features[i : i + batch_size]))
            for i in range(0, len(alerts), batch_size)
        ]
    )
    if scores.shape != (len(alerts),):
        raise ValueError(f"model answered {scores.shape[0]} scores for {len(alerts)} alerts")
    return scores


def score_alerts(
    models: Sequence[Model], alerts: Sequence[dict[str, Any]], batch_size: int = 16
) -> Scores:
    """Scores of every model for each alert. Inference runs in micro-batches of `batch_size`
    (ml.batch_size): on CPU, ONNX Runtime gains nothing from large batches (measured), while GPUs
    and TensorFlow do; the triplets are built once. Failures are counted, never scored 0."""
    result = Scores([{} for _ in alerts])
    if not models or not alerts:
        return result
    usable, triplets = _triplets(alerts)
    result.failures += (len(alerts) - len(usable)) * len(models)
    if triplets is None:
        return result
    chosen = [alerts[i] for i in usable]
    for model in models:
        try:
            scores = _run_model(model, triplets, chosen, batch_size)
        except Exception as exc:
            log.error("model %s failed on a batch of %d: %s", model.name, len(chosen), exc)
            result.failures += len(chosen)
            continue
        for i, score in zip(usable, scores, strict=True):
            if not math.isfinite(float(score)):
                result.failures += 1
                continue
            result.classifications[i][model.name] = float(score)
            result.classifications[i][f"{model.name}_version"] = model.spec.version
    return result
