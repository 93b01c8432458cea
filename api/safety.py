"""Input safety for user queries and filter pipelines.

Refused at any depth: server-side JavaScript (`$where`, `$function`, `$accumulator`) and writes
(`$out`, `$merge`). User strings are parsed as (Extended) JSON, never evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def forbidden_operators(tree: Any, forbidden: Iterable[str] = FORBIDDEN_EVERYWHERE) -> set[str]:
    """All keys of `tree` (at any depth, inside lists too) that are in `forbidden`."""
    banned = frozenset(forbidden)
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in banned:
                    found.add(key)
                stack.append(value)
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return found


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
    stack = [pipeline]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in CROSS_COLLECTION_STAGES:
                    target = (
                        value.get("from", value.get("coll")) if isinstance(value, dict) else value
                    )
                    if not isinstance(target, str):
                        raise BadRequest(
                            f"{key}: 'from' must be a collection name in this database"
                        )
                    names.add(target)
                stack.append(value)
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return names
