"""Input safety for user queries and filter pipelines.

Refused at any depth: server-side JavaScript (`$where`, `$function`, `$accumulator`), writes
(`$out`, `$merge`), server administration and change streams (`$currentOp`, `$collStats`,
`$changeStream`, ...), and regular expressions that may backtrack catastrophically: nested
quantifiers (`(a+)+b`), overlapping alternatives under a quantifier (`(a|ab)*c`), neighbouring
quantifiers over the same characters (`\\d*\\d*x`), found by `backtracking_risk`. Filter
pipelines may not read other collections at any depth. User strings are parsed as (Extended)
JSON with a bounded depth, never evaluated.
"""

from __future__ import annotations

import importlib
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


# A sound, conservative analysis of the parsed expression (Python's parser; MongoDB's PCRE has
# no safeguard of its own): a repeated part that may match in more than one way per repetition,
# or two neighbouring repeats that can take the same characters, make backtracking exponential
# or polynomial. Character sets are over-approximated (any case, any non-ASCII character for
# \d \w \s), so some harmless patterns are refused too, with a message saying why.

# the parsed form of regular expressions: Python's own parser (no type stubs)
sre: Any = importlib.import_module("re._constants")
sre_parse: Any = importlib.import_module("re._parser")
Node = tuple[Any, Any]
UNICODE_MAX = 0x10FFFF
Ranges = frozenset[tuple[int, int]]
REPEATS = frozenset({sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT})
ZERO_WIDTH = frozenset({sre.AT, sre.ASSERT, sre.ASSERT_NOT})
ASCII_CATEGORIES: dict[Any, list[tuple[int, int]]] = {
    sre.CATEGORY_DIGIT: [(48, 57)],
    sre.CATEGORY_WORD: [(48, 57), (65, 90), (95, 95), (97, 122)],
    sre.CATEGORY_SPACE: [(9, 13), (32, 32)],
}
NEGATED_CATEGORIES = {
    sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT,
    sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD,
    sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE,
}
ALL_CHARS: Ranges = frozenset({(0, UNICODE_MAX)})


def complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in sorted(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = max(start, hi + 1)
    if start <= UNICODE_MAX:
        out.append((start, UNICODE_MAX))
    return frozenset(out)


def overlap(a: Ranges, b: Ranges) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def any_case(lo: int, hi: int) -> list[tuple[int, int]]:
    """The range and its other-case ASCII letters (the case flag may come apart from the
    pattern, in `$options`)."""
    out = [(lo, hi)]
    for first, last, shift in ((65, 90, 32), (97, 122, -32)):
        a, b = max(lo, first), min(hi, last)
        if a <= b:
            out.append((a + shift, b + shift))
    return out


def category_ranges(category: Any) -> list[tuple[int, int]]:
    if category in NEGATED_CATEGORIES:
        return sorted(complement(frozenset(ASCII_CATEGORIES[NEGATED_CATEGORIES[category]])))
    return [*ASCII_CATEGORIES.get(category, []), (128, UNICODE_MAX)]


def set_ranges(items: list[Node]) -> Ranges:
    """Characters an `IN` (character class) may match, over-approximated."""
    negate = bool(items) and items[0][0] == sre.NEGATE
    out: list[tuple[int, int]] = []
    for op, av in items[1:] if negate else items:
        if op == sre.LITERAL:
            out += any_case(av, av)
        elif op == sre.RANGE:
            out += any_case(*av)
        elif op == sre.CATEGORY:
            out += category_ranges(av) if not negate else ASCII_CATEGORIES.get(av, [])
    # a negated class: the complement of a subset is a superset
    return complement(frozenset(out)) if negate else frozenset(out)


def children(node: Node) -> list[list[Node]]:
    """The sub-sequences of one parsed node."""
    op, av = node
    if op in REPEATS:
        return [list(av[2])]
    if op == sre.SUBPATTERN:
        return [list(av[3])]
    if op in (sre.ASSERT, sre.ASSERT_NOT):
        return [list(av[1])]
    if op == sre.ATOMIC_GROUP:
        return [list(av)]
    if op == sre.BRANCH:
        return [list(alt) for alt in av[1]]
    if op == sre.GROUPREF_EXISTS:
        return [list(av[1]), list(av[2] or [])]
    return []


def nodes(seq: list[Node]) -> Iterator[Node]:
    """Every node of `seq` at any depth."""
    stack = list(seq)
    while stack:
        node = stack.pop()
        yield node
        for child in children(node):
            stack.extend(child)


def nullable(seq: list[Node]) -> bool:
    return all(node_nullable(node) for node in seq)


def node_nullable(node: Node) -> bool:
    op, av = node
    if op in ZERO_WIDTH or op == sre.GROUPREF:
        return True
    if op in REPEATS:
        return av[0] == 0 or nullable(list(av[2]))
    if op in (sre.BRANCH, sre.GROUPREF_EXISTS):
        return any(nullable(seq) for seq in children(node))
    if op in (sre.SUBPATTERN, sre.ATOMIC_GROUP):
        return nullable(children(node)[0])
    return False


def chars(seq: list[Node]) -> Ranges:
    """Every character `seq` may consume (over-approximated)."""
    out: set[tuple[int, int]] = set()
    for op, av in nodes(seq):
        if op == sre.LITERAL:
            out.update(any_case(av, av))
        elif op == sre.IN:
            out.update(set_ranges(list(av)))
        elif op in (sre.NOT_LITERAL, sre.ANY, sre.GROUPREF):
            return ALL_CHARS
    return frozenset(out)


def first(seq: list[Node]) -> Ranges:
    """Characters a match of `seq` may start with (over-approximated)."""
    out: set[tuple[int, int]] = set()
    for node in seq:
        op = node[0]
        if op in ZERO_WIDTH:
            continue
        if op in (sre.LITERAL, sre.IN, sre.NOT_LITERAL, sre.ANY, sre.GROUPREF):
            out.update(chars([node]))
        else:
            for child in children(node):
                out.update(first(child))
        if not node_nullable(node):
            break
    return frozenset(out)


def repeats(node: Node) -> bool:
    """A quantifier that may take its part more than once."""
    return node[0] in REPEATS and node[1][1] > 1


def variable(node: Node) -> bool:
    """A quantifier whose number of repetitions is not fixed (`?`, `*`, `+`, `{m,n}`)."""
    return node[0] in REPEATS and node[1][0] != node[1][1]


def ambiguous_branch(seq: list[Node]) -> bool:
    """An alternation in `seq` whose alternatives may start alike (or two may match nothing)."""
    for op, av in nodes(seq):
        if op != sre.BRANCH:
            continue
        alts = [list(alt) for alt in av[1]]
        if sum(nullable(alt) for alt in alts) > 1:
            return True
        starts = [first(alt) for alt in alts]
        if any(overlap(a, b) for i, a in enumerate(starts) for b in starts[i + 1 :]):
            return True
    return False


def repeat_risk(node: Node) -> str | None:
    body = list(node[1][2])
    if any(variable(inner) for inner in nodes(body)):
        return "repeats a group that itself repeats (nested quantifiers)"
    if nullable(body):
        return "repeats something that can match the empty string"
    if ambiguous_branch(body):
        return "repeats alternatives that can match the same text (overlapping alternatives)"
    return None


def variable_chars(seq: list[Node]) -> Ranges:
    """Characters the variable quantifiers of `seq` may take."""
    out: set[tuple[int, int]] = set()
    for node in nodes(seq):
        if variable(node) and node[1][1] > 1:
            out.update(chars(list(node[1][2])))
    return frozenset(out)


def adjacent_risk(seq: list[Node]) -> str | None:
    """Two repeats in a row (only optional parts between them) over common characters, like
    `\\d*\\d*x`: the input can be split between them in many ways."""
    for i, node in enumerate(seq):
        left = variable_chars([node])
        if not left:
            continue
        for later in seq[i + 1 :]:
            if overlap(left, variable_chars([later])):
                return "has neighbouring quantifiers over the same characters"
            if not node_nullable(later):
                break
    return None


def sequences(seq: list[Node]) -> Iterator[list[Node]]:
    yield seq
    for node in nodes(seq):
        yield from children(node)


def marked_alternatives(pattern: str) -> str:
    """`pattern` with an empty lookahead after every `|`: Python's parser would otherwise merge
    alternatives (`[a-z]|[a-z0-9]` into one class) that MongoDB's engine backtracks over."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if char == "[":
            end = _skip_class(pattern, i)
            out.append(pattern[i:end])
            i = end
            continue
        out.append("|(?=)" if char == "|" else char)
        i += 1
    return "".join(out)


def backtracking_risk(pattern: str) -> str | None:
    """Why `pattern` may backtrack catastrophically, or None. A pattern Python cannot parse
    (PCRE-only syntax) gets the textual nested-quantifier check."""
    try:
        parsed = list(sre_parse.parse(marked_alternatives(pattern)))
    except (re.error, RecursionError, OverflowError):
        nested = has_nested_quantifier(pattern)
        return "repeats a group that itself repeats (nested quantifiers)" if nested else None
    for seq in sequences(parsed):
        for node in seq:
            problem = repeat_risk(node) if repeats(node) else None
            if problem:
                return problem
        problem = adjacent_risk(seq)
        if problem:
            return problem
    return None


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
        problem = backtracking_risk(pattern)
        if problem:
            raise BadRequest(
                f"{field}: regular expression {pattern!r} {problem} (catastrophic "
                "backtracking); rewrite it without nested quantifiers, overlapping alternatives "
                "under a quantifier or adjacent quantifiers over the same characters"
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
