"""Which document builder a survey's decoded records go through (the registry's `shape`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ingester.lsst import check_lsst_record, lsst_detection_id, split_decam, split_lsst
from ingester.mongify import Parts, split_alert
from kowalski.documents import Doc
from kowalski.surveys import Shape, Survey


def candid_of(record: Doc) -> int:
    return int(record["candid"])


@dataclass(frozen=True)
class DocumentShape:
    detection_id: Callable[[Doc], int]  # the unique detection id of a decoded record
    split: Callable[[Survey, Doc], Parts]  # decoded record -> alert document + aux parts
    # why a decoded record cannot be archived; None: the pipeline's check of ZTF-like alerts
    check: Callable[[Doc], str | None] | None = None


SHAPES: dict[Shape, DocumentShape] = {
    "ztf": DocumentShape(candid_of, split_alert),
    "lsst": DocumentShape(lsst_detection_id, split_lsst, check_lsst_record),
    "decam": DocumentShape(candid_of, split_decam),
}


def detection_id(survey: Survey, record: Doc) -> int:
    return SHAPES[survey.shape].detection_id(record)


def record_check(survey: Survey) -> Callable[[Doc], str | None] | None:
    return SHAPES[survey.shape].check


def split(survey: Survey, record: Doc) -> Parts:
    return SHAPES[survey.shape].split(survey, record)
