"""Input safety for user queries and filter pipelines.

Refused at any depth: server-side JavaScript (`$where`, `$function`, `$accumulator`) and writes
(`$out`, `$merge`). User strings are parsed as (Extended) JSON, never evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bson import json_util
from bson.errors import InvalidBSON

from api.responses import BadRequest, Forbidden

JAVASCRIPT_OPERATORS = frozenset({"$where", "$function", "$accumulator"})
WRITE_STAGES = frozenset({"$out", "$merge"})
ADMIN_STAGES = frozenset({"$currentOp", "$listSessions", "$listLocalSessions"})
FORBIDDEN_EVERYWHERE = JAVASCRIPT_OPERATORS | WRITE_STAGES | ADMIN_STAGES
# stages that read another collection: their target is checked against the caller's rights
CROSS_COLLECTION_STAGES = frozenset({"$lookup", "$graphLookup", "$unionWith"})


def parse_json_arg(value: Any, field: str) -> Any:
    """Objects pass through; strings are parsed as Extended JSON (never Python-evaluated)."""
    if isinstance(value, str):
        try:
            return json_util.loads(value)
        except (ValueError, TypeError, InvalidBSON) as exc:
            raise BadRequest(f"{field}: not valid JSON: {exc}") from None
    return value


def keyed_values(tree: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of every mapping in `tree`, at any depth, inside lists too."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                yield key, value
                stack.append(value)
        elif isinstance(node, list | tuple):
            stack.extend(node)


def forbidden_operators(tree: Any) -> set[str]:
    """All keys of `tree` (at any depth) that are forbidden everywhere."""
    return {key for key, _ in keyed_values(tree) if key in FORBIDDEN_EVERYWHERE}


def check_safe(tree: Any, field: str) -> None:
    bad = forbidden_operators(tree)
    if bad:
        kinds = []
        if bad & JAVASCRIPT_OPERATORS:
            kinds.append("server-side JavaScript")
        if bad & WRITE_STAGES:
            kinds.append("writes")
        if bad & ADMIN_STAGES:
            kinds.append("server administration")
        raise Forbidden(f"{field} uses forbidden operators {sorted(bad)} ({', '.join(kinds)})")


def referenced_collections(pipeline: Any) -> set[str]:
    """Collections named by $lookup / $graphLookup / $unionWith anywhere in a pipeline."""
    names: set[str] = set()
    for key, value in keyed_values(pipeline):
        if key in CROSS_COLLECTION_STAGES:
            target = value.get("from", value.get("coll")) if isinstance(value, dict) else value
            if not isinstance(target, str):
                raise BadRequest(f"{key}: 'from' must be a collection name in this database")
            names.add(target)
    return names
