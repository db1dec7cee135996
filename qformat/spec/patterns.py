"""Module-name patterns with compressed-tensors / vLLM semantics, matched in bounded time.

A pattern is either an exact module name ("model.layers.0.mlp.down_proj") or a regular expression prefixed with "re:"
that is applied with `re.match`, i.e. anchored at the start of the name but not at its end ("re:.*down_proj" matches
"model.layers.0.mlp.down_proj"; "re:mlp" matches nothing that does not start with "mlp").

Patterns come from checkpoints, i.e. from strangers, and Python's `re` backtracks exponentially on patterns such as
`re:(a|aa)+$` (minutes per module name). So a pattern is checked with `re.compile` (the syntax and error messages
users know) and then matched with the `regex` package in its `re`-compatible VERSION0 mode, which takes a time limit:
a pattern that runs past `MATCH_TIMEOUT_S` on one name, or spends `PATTERN_BUDGET_S` in total at more than
`SLOW_MATCH_S` per name, is refused once and for all ("backtracks catastrophically; simplify it"). The few constructs
on which `regex` and `re` disagree (POSIX classes and set operations inside `[...]`, `{...}` that `re` reads as
literal text but `regex` as a fuzzy-match constraint) are refused at validation, so every accepted pattern means
exactly what `re.match` makes of it.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Generic, TypeVar

import regex

from qformat.errors import OptionError

__all__ = [
    "MATCH_TIMEOUT_S",
    "MAX_PATTERN_LENGTH",
    "MAX_REGEX_PATTERNS",
    "PATTERN_BUDGET_S",
    "REGEX_PREFIX",
    "SLOW_MATCH_S",
    "PatternSet",
    "RuleSet",
    "any_match",
    "first_match",
    "pattern_matches",
    "validate_pattern",
]

REGEX_PREFIX = "re:"
#: Longest pattern accepted (an exact module name or `re:` + expression); real ones are under 200 characters.
MAX_PATTERN_LENGTH = 1024
#: Most `re:` patterns one list (overrides, ignore, a config group's targets) may hold; exact names are not limited.
MAX_REGEX_PATTERNS = 128
#: Time limit of one match of one pattern against one module name.
MATCH_TIMEOUT_S = 0.25
#: Total matching time a pattern may spend while its names take more than `SLOW_MATCH_S` each on average. Together
#: with `MAX_REGEX_PATTERNS` this bounds the matching work a checkpoint can cause, however many modules it has.
PATTERN_BUDGET_S = 1.0
#: A module-name match takes microseconds; a pattern averaging more than this per name is backtracking.
SLOW_MATCH_S = 1e-3

_QUANTIFIER = re.compile(r"\{\d*(?:,\d*)?\}")


@dataclass
class _Regex:
    """A compiled `re:` expression with its running cost; `refused` is set once it proved too slow."""

    source: str
    compiled: regex.Pattern[str]
    spent: float = 0.0
    calls: int = 0
    refused: str | None = field(default=None)


def _too_slow(expression: str) -> str:
    return (f"pattern 're:{expression}' backtracks catastrophically (matching one module name takes too long); "
            "simplify it, e.g. avoid nested repeats such as (a|aa)+ or (\\w+\\.?)*")


def _literal_brace(expression: str) -> int | None:
    """Position of a `{` outside `[...]` that `re` reads as literal text (not a `{m,n}` repeat), or None."""
    i, in_set, n = 0, False, len(expression)
    while i < n:
        char = expression[i]
        if char == "\\":
            i += 2
            continue
        if in_set:
            if char == "]":
                in_set = False
        elif char == "[":
            in_set = True
            i += 1
            if i < n and expression[i] == "^":
                i += 1
            if i < n and expression[i] == "]":  # a leading "]" is a member, not the end
                i += 1
            continue
        elif char == "{":
            found = _QUANTIFIER.match(expression, i)
            if found is None or found.group() == "{}":
                return i
        i += 1
    return None


@lru_cache(maxsize=1024)
def _compile(expression: str) -> _Regex:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # "Possible nested set": regex reads these differently
            re.compile(expression)
    except re.error as exc:
        raise OptionError(f"invalid regular expression in pattern 're:{expression}': {exc}") from None
    except FutureWarning as exc:
        raise OptionError(f"pattern 're:{expression}' is ambiguous ({exc}); escape the '[' or the repeated "
                          "character, e.g. write '\\[' for a literal bracket") from None
    brace = _literal_brace(expression)
    if brace is not None:
        raise OptionError(f"pattern 're:{expression}' has a '{{' at position {brace} that is not a {{m,n}} repeat; "
                          "write '\\{' for a literal brace")
    try:
        return _Regex(expression, regex.compile(expression, regex.VERSION0))
    except regex.error as exc:
        raise OptionError(f"invalid regular expression in pattern 're:{expression}': {exc}") from None


def validate_pattern(pattern: str) -> str:
    """Return `pattern` unchanged if it is a usable pattern; raise `OptionError` otherwise."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise OptionError(f"empty module pattern {pattern!r}; give a module name or 're:<regex>'")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise OptionError(f"pattern {pattern[:60]!r}... is {len(pattern)} characters long; qformat accepts patterns "
                          f"of at most {MAX_PATTERN_LENGTH}")
    if pattern.startswith(REGEX_PREFIX):
        _compile(pattern[len(REGEX_PREFIX) :])
    return pattern


def _regex_match(rx: _Regex, name: str) -> bool:
    """`re.match(rx, name)` semantics within the time limits; refuses the pattern for good when it exceeds them."""
    if rx.refused is not None:
        raise OptionError(rx.refused)
    start = time.perf_counter()
    try:
        found = rx.compiled.match(name, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        rx.refused = _too_slow(rx.source)
        raise OptionError(rx.refused) from None
    rx.spent += time.perf_counter() - start
    rx.calls += 1
    if rx.spent > PATTERN_BUDGET_S and rx.spent > rx.calls * SLOW_MATCH_S:
        rx.refused = _too_slow(rx.source)
        raise OptionError(rx.refused)
    return found


def pattern_matches(pattern: str, name: str) -> bool:
    """True if `pattern` selects the module called `name`; `OptionError` if the pattern is invalid or too slow."""
    if pattern.startswith(REGEX_PREFIX):
        validate_pattern(pattern)
        return _regex_match(_compile(pattern[len(REGEX_PREFIX) :]), name)
    return pattern == name


def _check_count(patterns: Sequence[str], what: str) -> None:
    count = sum(1 for p in patterns if p.startswith(REGEX_PREFIX))
    if count > MAX_REGEX_PATTERNS:
        raise OptionError(f"{what} holds {count} 're:' patterns; qformat accepts at most {MAX_REGEX_PATTERNS} per "
                          "list (list exact module names instead, or merge patterns)")


class PatternSet:
    """A list of patterns compiled once: exact names looked up in a set, `re:` patterns tried in order.

    Use it to test many module names against one list (compressed-tensors' `targets`/`ignore`, `--ignore`): the cost
    per name is one set lookup plus one bounded match per `re:` pattern, not one comparison per listed name.
    """

    def __init__(self, patterns: Iterable[str], *, what: str = "the pattern list") -> None:
        listed = [validate_pattern(p) for p in patterns]
        _check_count(listed, what)
        self.exact: dict[str, int] = {}
        for i, p in enumerate(listed):
            if not p.startswith(REGEX_PREFIX):
                self.exact.setdefault(p, i)
        self.regexes = tuple((i, p) for i, p in enumerate(listed) if p.startswith(REGEX_PREFIX))

    def matching(self, name: str) -> str | None:
        """The first pattern in list order that selects `name`, or None."""
        position = self.exact.get(name)
        for i, pattern in self.regexes:
            if position is not None and i > position:
                break
            if pattern_matches(pattern, name):
                return pattern
        return name if position is not None else None

    def matches(self, name: str) -> bool:
        return self.matching(name) is not None


V = TypeVar("V")


class RuleSet(Generic[V]):
    """Rules `(pattern, value)` compiled once, applied with `first_match`'s precedence (exact name, then the first
    matching `re:` rule in list order)."""

    def __init__(self, rules: Sequence[tuple[str, V]], *, what: str = "the rule list") -> None:
        _check_count([validate_pattern(p) for p, _ in rules], what)
        self.exact: dict[str, tuple[str, V]] = {}
        for rule in rules:
            if not rule[0].startswith(REGEX_PREFIX):
                self.exact.setdefault(rule[0], rule)
        self.regex_rules = tuple(rule for rule in rules if rule[0].startswith(REGEX_PREFIX))

    def first(self, name: str) -> tuple[str, V] | None:
        found = self.exact.get(name)
        if found is not None:
            return found
        return next((rule for rule in self.regex_rules if pattern_matches(rule[0], name)), None)


def first_match(rules: Sequence[tuple[str, str]], name: str) -> tuple[str, str] | None:
    """Pick the rule `(pattern, value)` that applies to `name`, or None.

    Precedence (docs/FORMAT.md, "Resolving a module's scheme"): an exact-name rule beats every `re:` rule; among `re:`
    rules the first one listed wins. For many names against one list, build a `RuleSet` once instead.
    """
    for rule in rules:
        if not rule[0].startswith(REGEX_PREFIX) and rule[0] == name:
            return rule
    for rule in rules:
        if rule[0].startswith(REGEX_PREFIX) and pattern_matches(rule[0], name):
            return rule
    return None


def any_match(patterns: Iterable[str], name: str) -> bool:
    """True if any of `patterns` selects `name`."""
    return any(pattern_matches(p, name) for p in patterns)
