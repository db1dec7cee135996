"""Read a JSON (or text) file from a folder qformat did not write (config.json, generation config, index files) safely.

`json.loads` on untrusted bytes can fail in ways that are not `JSONDecodeError`: deep nesting raises
`RecursionError`, an integer of more than 4300 digits raises a plain `ValueError`, and a `NaN`/`Infinity` literal or
a float like `1e400` parses to a non-finite number that later code turns into wrong sizes or crashes. A FIFO or a
device named `config.json` blocks the reader forever, and an escaped lone surrogate (`"\\ud800"`) gives a string that
cannot be written back as UTF-8. `load_json` refuses each of these with one line that names the file, as the error
class its caller chooses (`FormatError` for a checkpoint, `SourceError` for a conversion source).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from qformat.errors import FormatError, QFormatError

__all__ = ["CONFIG_MAX_BYTES", "INDEX_MAX_BYTES", "JSON_MAX_DEPTH", "TEXT_MAX_BYTES", "load_json", "read_text"]

#: Largest config-like JSON file read (config.json, generation_config.json, tokenizer-free metadata). A qformat
#: config.json records a hash and a statistics entry per quantized module (about 400 bytes each), so this allows
#: checkpoints with over 100,000 quantized Linear modules while refusing a file meant to exhaust memory.
CONFIG_MAX_BYTES = 64 * 2**20
#: Largest `*.index.json` read: one entry per tensor, and a reader refuses more tensors than that anyway.
INDEX_MAX_BYTES = 100 * 2**20
#: Largest text file read whole (a model card): real cards are well under 1 MiB.
TEXT_MAX_BYTES = 8 * 2**20
#: Deepest nesting of objects and lists accepted. Real configs nest fewer than 10 levels; Python's JSON decoder and
#: every recursive walk over the result (deepcopy, json.dumps, transformers' config classes) fail near 1000.
JSON_MAX_DEPTH = 64


class _Refused(Exception):
    """Internal: the parse hooks' way of stopping `json.loads` with a reason."""


def _no_constant(literal: str) -> Any:
    raise _Refused(f"holds the non-standard literal {literal}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"holds the number {text[:40]}, which is not finite as a 64-bit float")
    return value


def _read_bytes(path: Path, max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; raises `_Refused` or `OSError`.

    With `follow_symlinks=False` a symlink at `path` is refused (O_NOFOLLOW), so a planted link cannot make qformat
    read, and then publish, a file from outside the folder.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        if path.is_symlink():
            raise _Refused("is a symbolic link; qformat reads only regular files inside the folder")
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _Refused("is not a regular file")
        if info.st_size > max_bytes:
            raise _Refused(f"is {info.st_size} bytes; qformat reads at most {max_bytes}")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _Refused(f"grew past {max_bytes} bytes while it was read")
    return data


def _check_tree(value: Any, max_depth: int) -> None:
    """Walk the parsed value without recursion: refuse nesting past `max_depth` and strings that are not UTF-8."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            if isinstance(item, str):
                _check_string(item)
            continue
        if depth > max_depth:
            raise _Refused(f"nests objects and lists deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("holds a string with an unpaired surrogate escape (not valid Unicode)") from None


def read_text(path: str | Path, *, error: type[QFormatError] = FormatError, max_bytes: int = TEXT_MAX_BYTES,
              follow_symlinks: bool = False, what: str = "replace it with a regular file") -> str:
    """The UTF-8 text of the regular file at `path` (a model card, say), read with the same limits as `load_json`:
    at most `max_bytes`, never a FIFO or device, and by default never through a symlink. Failures raise `error`
    with one line that names the file and ends with `what`."""
    path = Path(path)
    try:
        return _read_bytes(path, max_bytes, follow_symlinks=follow_symlinks).decode("utf-8")
    except _Refused as exc:
        raise error(f"{path} {exc}; {what}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}); {what}") from None
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}); {what}") from None


def load_json(path: str | Path, *, error: type[QFormatError] = FormatError, max_bytes: int = CONFIG_MAX_BYTES,
              max_depth: int = JSON_MAX_DEPTH, what: str = "fix or re-download it") -> Any:
    """Parse the JSON file at `path`, refusing anything `json.loads` would choke on or return malformed.

    Limits: a regular file of at most `max_bytes`, UTF-8 without a byte-order mark, nesting of at most `max_depth`,
    no `NaN`/`Infinity` literals or floats that overflow, integers within Python's 4300-digit conversion limit, no
    unpaired surrogates. Any failure (including `OSError`) raises `error` with one line that names the file and ends
    with `what` (the advice to the user).
    """
    path = Path(path)
    try:
        text = _read_bytes(path, max_bytes).decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
        _check_tree(value, max_depth)
    except _Refused as exc:
        raise error(f"{path} {exc}; {what}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}); {what}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {what}") from None
    except RecursionError:
        raise error(f"{path} nests objects and lists deeper than {max_depth} levels; {what}") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise error(f"{path} holds a value JSON readers refuse ({str(exc).splitlines()[0][:120]}); {what}") from None
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}); {what}") from None
    return value
