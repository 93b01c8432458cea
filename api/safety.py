"""Input safety for user queries and filter pipelines.

Refused at any depth: server-side JavaScript (`$where`, `$function`, `$accumulator`), writes
(`$out`, `$merge`), server administration and change streams (`$currentOp`, `$collStats`,
`$changeStream`, ...), and regular expressions with nested quantifiers (catastrophic
backtracking, e.g. `(a+)+b`). Filter pipelines may not read other collections at any depth.
User strings are parsed as (Extended) JSON with a bounded depth, never evaluated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from bson import json_util
from bson.errors import BSONError
from bson.regex import Regex

from api.responses import BadRequest, Forbidden

JAVASCRIPT_OPERATORS = frozenset({"$where", "$function", "$accumulator"})
WRITE_STAGES = frozenset({"$out", "$merge"})
ADMIN_STAGES = frozenset(
    {
        "$currentOp",
        "$listSessions",
        "$listLocalSessions",
        "$changeStream",
        "$changeStreamSplitLargeEvent",
        "$collStats",
        "$indexStats",
        "$planCacheStats",
        "$listSearchIndexes",
        "$listCatalog",
        "$listClusterCatalog",
        "$listSampledQueries",
        "$queryStats",
        "$querySettings",
        "$shardedDataDistribution",
    }
)
FORBIDDEN_EVERYWHERE = JAVASCRIPT_OPERATORS | WRITE_STAGES | ADMIN_STAGES
# stages that read another collection: their target is checked against the caller's rights
CROSS_COLLECTION_STAGES = frozenset({"$lookup", "$graphLookup", "$unionWith"})
REGEX_OPERATORS = frozenset({"$regexMatch", "$regexFind", "$regexFindAll"})
MAX_JSON_DEPTH = 100
MAX_REGEX_LENGTH = 1000
# errors bson's Extended JSON parser raises for malformed values ({"$oid": "zz"}, {"$date": 1e300})
EXTENDED_JSON_ERRORS = (ValueError, TypeError, ArithmeticError, BSONError, KeyError, IndexError)


def parse_json(text: str, field: str) -> Any:
    """(Extended) JSON text as Python/BSON values; any malformed input is a 400 naming `field`."""
    try:
        value = json_util.loads(text)
    except RecursionError:
        raise BadRequest(f"{field}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{field}: not valid JSON: {exc}") from None
    except EXTENDED_JSON_ERRORS as exc:
        raise BadRequest(f"{field}: invalid Extended JSON value: {exc}") from None
    check_depth(value, field)
    return value


def check_depth(tree: Any, field: str, limit: int = MAX_JSON_DEPTH) -> None:
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise BadRequest(f"{field}: nested deeper than {limit} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)


def parse_json_arg(value: Any, field: str) -> Any:
    """Objects pass through (depth-checked); strings are parsed as Extended JSON (never
    Python-evaluated)."""
    if isinstance(value, str):
        return parse_json(value, field)
    check_depth(value, field)
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


def all_values(tree: Any) -> Iterator[Any]:
    """Every value (containers included) in `tree`, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def forbidden_operators(tree: Any) -> set[str]:
    """All keys of `tree` (at any depth) that are forbidden everywhere."""
    return {key for key, _ in keyed_values(tree) if key in FORBIDDEN_EVERYWHERE}


# ------------------------------------------------------------------ regular expressions

QUANTIFIER_START = re.compile(r"[*+?]|\{\d*,?\d*\}")


def _skip_class(pattern: str, i: int) -> int:
    """Index just past the character class that starts at `pattern[i] == '['`."""
    i += 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _repeats(pattern: str, i: int) -> bool:
    """Whether a quantifier that repeats more than once starts at `pattern[i]`."""
    match = QUANTIFIER_START.match(pattern, i)
    if not match:
        return False
    text = match.group()
    if text == "?":
        return False
    if text.startswith("{"):
        bounds = text[1:-1].split(",")
        return len(bounds) == 2 or (bounds[0].isdigit() and int(bounds[0]) > 1)
    return True


def has_nested_quantifier(pattern: str) -> bool:
    """Conservative check for catastrophic backtracking: a repeated group that itself contains a
    repeat, like `(a+)+`, `(a*)*`, `(?:ab+){2,}` (false positives are acceptable)."""
    inner_repeat: list[bool] = []  # per open group: does it contain a repeat?
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            if _repeats(pattern, i) and inner_repeat:
                inner_repeat[-1] = True
            continue
        if char == "[":
            i = _skip_class(pattern, i)
            if _repeats(pattern, i) and inner_repeat:
                inner_repeat[-1] = True
            continue
        if char == "(":
            inner_repeat.append(False)
        elif char == ")" and inner_repeat:
            had_repeat = inner_repeat.pop()
            if _repeats(pattern, i + 1):
                if had_repeat:
                    return True
                if inner_repeat:
                    inner_repeat[-1] = True
            elif had_repeat and inner_repeat:
                inner_repeat[-1] = True
        elif _repeats(pattern, i) and inner_repeat and pattern[i - 1 : i] not in ("(", "|"):
            inner_repeat[-1] = True
        i += 1
    return False


def regex_patterns(tree: Any) -> Iterator[str]:
    """Every regular expression in a filter or pipeline: `$regex` values, BSON regexes and the
    `regex` argument of `$regexMatch` / `$regexFind` / `$regexFindAll`."""
    for node in all_values(tree):
        if isinstance(node, Regex | re.Pattern):
            yield str(node.pattern)
    for key, value in keyed_values(tree):
        if key == "$regex" and isinstance(value, str):
            yield value
        elif key in REGEX_OPERATORS and isinstance(value, dict):
            regex = value.get("regex")
            if isinstance(regex, str):
                yield regex


def check_regexes(tree: Any, field: str) -> None:
    for pattern in regex_patterns(tree):
        if len(pattern) > MAX_REGEX_LENGTH:
            raise BadRequest(f"{field}: regular expression longer than {MAX_REGEX_LENGTH}")
        if has_nested_quantifier(pattern):
            raise BadRequest(
                f"{field}: regular expression {pattern!r} repeats a group that itself repeats "
                "(catastrophic backtracking); rewrite it without nested quantifiers"
            )


# ------------------------------------------------------------------ operators and joins


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
    check_regexes(tree, field)


def joins(pipeline: Any) -> Iterator[tuple[str, Any]]:
    """(stage, target collection) of every $lookup / $graphLookup / $unionWith at any depth."""
    for key, value in keyed_values(pipeline):
        if key in CROSS_COLLECTION_STAGES:
            target = value.get("from", value.get("coll")) if isinstance(value, dict) else value
            if not isinstance(target, str):
                raise BadRequest(f"{key}: 'from' must be a collection name in this database")
            yield key, target


def referenced_collections(pipeline: Any) -> set[str]:
    """Collections named by $lookup / $graphLookup / $unionWith anywhere in a pipeline."""
    names = {target for _, target in joins(pipeline)}
    system = sorted(n for n in names if n.startswith("system."))
    if system:
        raise Forbidden(f"Forbidden: {system[0]} is a protected collection")
    return names


def check_filter_pipeline(pipeline: Any, field: str) -> None:
    """A filter / autosave / auto_followup pipeline: safe operators, and no joins at any depth
    (the configured stages do the joins a filter needs)."""
    check_safe(pipeline, field)
    used = sorted({stage for stage, _ in joins(pipeline)})
    if used:
        raise Forbidden(f"{field} uses forbidden stages {used} (at any depth)")
