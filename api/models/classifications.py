"""`/api/classifications` bodies."""

from __future__ import annotations

from typing import Any

from pydantic import (
    RootModel,
    model_validator,
)

from api.models.base import (
    Model,
)
from api.models.triggers import MmaTrigger, TooTrigger
from api.responses import BadRequest

LABEL_KINDS = ("human_labels", "ml_scores")
Labels = dict[str, dict[str, float]]  # kind -> label -> score


def scores(value: Any, field: str) -> dict[str, float]:
    """{label: score} | [labels] | "a,b" -> {label: score}; lists/strings mean score 1.0."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        value = dict.fromkeys(map(str, value), 1.0)
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object, a list or a comma-separated string")
    out = {}
    for label, score in value.items():
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise BadRequest(f"{field}.{label} must be a number")
        if "." in label or label.startswith("$"):
            raise BadRequest(f"{field}: invalid label {label!r}")
        out[label] = float(score)
    return out


def candid_keys(body: Any) -> list[int]:
    try:
        return [int(c) for c in body]
    except (TypeError, ValueError):
        raise BadRequest("keys of the body must be candids (integers)") from None


class ClassificationsPut(RootModel[dict[int, Labels]]):
    """`PUT /api/classifications/{survey}` (admin): `{candid: {human_labels, ml_scores}}`, each
    `{label: score}`, a list of labels or "a,b" (score 1), merged into the stored labels."""

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, body: Any) -> dict[int, Labels]:
        out: dict[int, Labels] = {}
        for key, candid in zip(body, candid_keys(body), strict=True):
            entry = body[key]
            if not isinstance(entry, dict) or not set(entry) <= set(LABEL_KINDS):
                raise BadRequest(f"{key} must be an object with keys among {list(LABEL_KINDS)}")
            out[candid] = {k: scores(entry.get(k, {}), f"{key}.{k}") for k in LABEL_KINDS}
        return out


class ClassificationsDelete(RootModel[dict[int, dict[str, list[str]]]]):
    """`DELETE /api/classifications/{survey}` (admin): `{candid: {human_labels: [labels],
    ml_scores: [labels]}}` removes those labels."""

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, body: Any) -> dict[int, dict[str, list[str]]]:
        out: dict[int, dict[str, list[str]]] = {}
        for key, candid in zip(body, candid_keys(body), strict=True):
            entry = body[key]
            if not isinstance(entry, dict):
                raise BadRequest(f"{key} must be an object")
            out[candid] = {
                k: [label for label in (entry.get(k) or []) if isinstance(label, str)]
                for k in LABEL_KINDS
            }
        return out


TRIGGERS: tuple[type[Model], ...] = (TooTrigger, MmaTrigger)
