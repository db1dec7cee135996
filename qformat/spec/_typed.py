"""Type checks for values parsed from untrusted JSON, each failing with a `FormatError` that names the key path.

JSON gives `"false"` where a reader expects `false`, `true` where it expects `1`, and an object where it expects a
list; Python then treats the string as true, the bool as an int and iterates the object's keys. The spec's readers
call these helpers on every value they use, so a wrong type is one clear error instead of a wrong answer or a
`TypeError` deep inside a tool.
"""

from __future__ import annotations

import math
from typing import Any

from qformat.errors import FormatError

__all__ = ["bool_at", "int_at", "json_type", "list_at", "number_at", "object_at", "short", "str_at"]

_MISSING = object()


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def short(value: Any) -> str:
    """`repr(value)` cut to one short line: messages quote untrusted data."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _wrong(path: str, wanted: str, value: Any) -> FormatError:
    return FormatError(f"{path} must be {wanted}, got {json_type(value)} {short(value)}; "
                       "fix the checkpoint's config.json")


def object_at(value: Any, path: str, *, nullable: bool = False) -> dict[str, Any] | None:
    """`value` if it is a JSON object (or null where `nullable`)."""
    if isinstance(value, dict) or (nullable and value is None):
        return value
    raise _wrong(path, "an object" + (" or null" if nullable else ""), value)


def list_at(value: Any, path: str, *, nullable: bool = False) -> list[Any] | None:
    """`value` if it is a JSON list (or null where `nullable`)."""
    if isinstance(value, list) or (nullable and value is None):
        return value
    raise _wrong(path, "a list" + (" or null" if nullable else ""), value)


def str_at(value: Any, path: str, *, nullable: bool = False) -> str | None:
    """`value` if it is a JSON string (or null where `nullable`)."""
    if isinstance(value, str) or (nullable and value is None):
        return value
    raise _wrong(path, "a string" + (" or null" if nullable else ""), value)


def int_at(value: Any, path: str, *, nullable: bool = False, minimum: int | None = 0) -> int | None:
    """`value` if it is a JSON integer, not a boolean, at least `minimum` (or null where `nullable`)."""
    if nullable and value is None:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        floor = "" if minimum is None else f" >= {minimum}"
        raise _wrong(path, f"an integer{floor}" + (" or null" if nullable else ""), value)
    return value


def number_at(value: Any, path: str, *, nullable: bool = False) -> float | int | None:
    """`value` if it is a finite JSON number, not a boolean (or null where `nullable`)."""
    if nullable and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _wrong(path, "a finite number" + (" or null" if nullable else ""), value)
    return value


def bool_at(value: Any, path: str) -> bool:
    """`value` if it is `true` or `false` (a string "false" is not)."""
    if isinstance(value, bool):
        return value
    raise _wrong(path, "true or false", value)
