"""Module-name patterns with compressed-tensors / vLLM semantics.

A pattern is either an exact module name ("model.layers.0.mlp.down_proj") or a regular expression prefixed with "re:"
that is applied with `re.match`, i.e. anchored at the start of the name but not at its end ("re:.*down_proj" matches
"model.layers.0.mlp.down_proj"; "re:mlp" matches nothing that does not start with "mlp").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

from qformat.errors import OptionError

__all__ = ["REGEX_PREFIX", "first_match", "pattern_matches", "validate_pattern"]

REGEX_PREFIX = "re:"


@lru_cache(maxsize=512)
def _compile(expression: str) -> re.Pattern[str]:
    try:
        return re.compile(expression)
    except re.error as exc:
        raise OptionError(f"invalid regular expression in pattern 're:{expression}': {exc}") from None


def validate_pattern(pattern: str) -> str:
    """Return `pattern` unchanged if it is a usable pattern; raise `OptionError` otherwise."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise OptionError(f"empty module pattern {pattern!r}; give a module name or 're:<regex>'")
    if pattern.startswith(REGEX_PREFIX):
        _compile(pattern[len(REGEX_PREFIX) :])
    return pattern


def pattern_matches(pattern: str, name: str) -> bool:
    """True if `pattern` selects the module called `name`."""
    if pattern.startswith(REGEX_PREFIX):
        return _compile(pattern[len(REGEX_PREFIX) :]).match(name) is not None
    return pattern == name


def first_match(rules: Sequence[tuple[str, str]], name: str) -> tuple[str, str] | None:
    """Pick the rule `(pattern, value)` that applies to `name`, or None.

    Precedence (docs/FORMAT.md, "Resolving a module's scheme"): an exact-name rule beats every `re:` rule; among `re:`
    rules the first one listed wins.
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
