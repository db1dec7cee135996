"""The safetensors container, read and written without holding tensors in memory.

`safetensors.save_file` needs every tensor of a file in memory at once, which defeats streaming conversion. The format
is simple (8-byte little-endian header length, a JSON header padded with spaces to a multiple of 8, then the raw
tensor bytes), so qformat lays out a file from its tensor list alone, writes the header first and each tensor's bytes
at its offset as soon as they exist. The layout reproduces the safetensors serializer exactly (tensors ordered by
dtype, descending in safetensors' dtype order, then by name), so a file written here is byte-identical to
`safetensors.torch.save_file` of the same tensors and metadata; tests check this.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformat.errors import CorruptCheckpointError
from qformat.spec.layout import DTYPE_SIZES, TensorSpec

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_TENSORS_PER_CHECKPOINT",
    "MAX_TENSORS_PER_FILE",
    "SHARD_METADATA",
    "FileLayout",
    "HeaderEntry",
    "SafetensorsHeader",
    "iter_tensor_chunks",
    "layout_file",
    "open_tensor_data",
    "read_header",
    "read_into",
]

#: safetensors refuses headers above 100,000,000 bytes; so does qformat.
MAX_HEADER_BYTES = 100_000_000
#: Most tensors qformat reads from one safetensors file. Real shards hold a few thousand (DeepSeek-V3 and Kimi-K2:
#: ~100-150k tensors in 60-160 shards); the cap stops a header of a million empty tensors before it costs gigabytes.
MAX_TENSORS_PER_FILE = 65_536
#: Most tensors qformat reads from one checkpoint, all weight files (or index entries) together.
MAX_TENSORS_PER_CHECKPOINT = 262_144
#: The `__metadata__` of every file qformat writes (convert, import, export): transformers' torch save writes it,
#: and older loaders refuse a file without {"format": "pt"}.
SHARD_METADATA = {"format": "pt"}

# serde_json, which parses safetensors headers, refuses a 128th level of nested objects and lists.
_MAX_JSON_DEPTH = 127
# Offsets and dimensions are Rust `usize` in safetensors: integers in [0, 2**64 - 1].
_U64_MAX = 2**64 - 1
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")
# Keys serde refuses to see twice in one object (other duplicates are last-wins there, as in Python's json).
_UNIQUE_KEYS = frozenset(("__metadata__", *_TENSOR_FIELDS))

# safetensors' `Dtype` enum order; files order tensors by dtype descending in this order, then by name.
_DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
                "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]  # fmt: skip
_DTYPE_RANK = {name: rank for rank, name in enumerate(_DTYPE_ORDER)}


@dataclass(frozen=True, slots=True)
class HeaderEntry:
    """A tensor as a safetensors header records it; `start`/`end` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of one safetensors file."""

    path: Path
    header_bytes: bytes
    data_start: int
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, HeaderEntry]


class _Refused(Exception):
    """Internal: why a header is not valid safetensors; `read_header` turns it into a `CorruptCheckpointError`."""


def _corrupt(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path.name} is not a valid safetensors file: {what}. Re-download or re-save it (the file may be truncated)"
    )


def _show(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters so that an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """The raw JSON header of `path` and the file's size; refuses a header past MAX_HEADER_BYTES or the file end."""
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"it is {file_size} bytes long, too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {length} exceeds safetensors' limit of {MAX_HEADER_BYTES:,} bytes")
            if 8 + length > file_size:
                raise _corrupt(path, f"header says {length} bytes but the file has only {file_size - 8} after it")
            raw = fh.read(length)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) != length:
        raise _corrupt(path, "the file changed while its header was read")
    return raw, file_size


class _Decoder:
    """`json.loads` hooks that make Python's parser accept only what serde_json (safetensors' parser) accepts, and stop
    as soon as the header holds more objects than `max_objects` (before a huge header is materialized)."""

    def __init__(self, max_objects: int) -> None:
        self.objects = 0
        self.max_objects = max_objects

    def object_pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        self.objects += 1
        if self.objects > self.max_objects:
            raise _TooManyObjects
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen and key in _UNIQUE_KEYS:
                    raise _Refused(f"key {key!r} appears twice in one object")
                seen.add(key)
        return obj

    @staticmethod
    def integer(text: str) -> int | float:
        if text == "-0":
            return -0.0  # serde_json reads -0 as a float, which no offset or dimension may be
        value = int(text)  # ValueError past Python's 4300-digit limit; serde refuses those too (out of range)
        if -(2**63) <= value <= _U64_MAX:
            return value
        as_float = float(text)  # serde_json reads integers beyond 64 bits as floats, refusing those that overflow
        if not math.isfinite(as_float):
            raise _Refused(f"number {text[:20]}... is out of range")
        return as_float

    @staticmethod
    def floating(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _Refused(f"number {text[:20]} is out of range")
        return value

    @staticmethod
    def constant(text: str) -> None:
        raise _Refused(f"{text} is not JSON")


class _TooManyObjects(Exception):
    """Internal: the header holds more JSON objects than the tensor limit allows."""


def _parse_json(raw: bytes, max_objects: int) -> Any:
    """Parse header bytes with serde_json's rules (see `_Decoder`); raises `_Refused` or `_TooManyObjects`."""
    decoder = _Decoder(max_objects)
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=decoder.object_pairs, parse_int=decoder.integer,
                          parse_float=decoder.floating, parse_constant=decoder.constant)
    except UnicodeDecodeError as exc:
        raise _Refused(f"header is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise _Refused(f"header is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise _Refused(f"header nests objects and lists deeper than {_MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # Python's integer digit limit
        raise _Refused(f"header holds a number out of range ({str(exc).splitlines()[0][:80]})") from None


def _check_unicode(strings: Iterable[str], what: str) -> None:
    """Refuse lone surrogates (JSON escapes like \\ud800 that are not valid Unicode), as serde_json does."""
    try:
        "\0".join(strings).encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused(f"{what} holds a lone surrogate escape (not valid Unicode)") from None


def _check_unknown(value: Any, depth: int) -> None:
    """Walk a field safetensors ignores (without recursion): it may not nest past serde's limit nor hold a lone
    surrogate; `depth` is the nesting level of `value` itself."""
    stack = [(value, depth)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            _check_unicode(item, "an unknown field")
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            if isinstance(item, str):
                _check_unicode((item,), "an unknown field")
            continue
        if level > _MAX_JSON_DEPTH:
            raise _Refused(f"header nests objects and lists deeper than {_MAX_JSON_DEPTH} levels")
        stack.extend((child, level + 1) for child in children)


def _is_u64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _U64_MAX  # bools and floats are not integers to serde


def _entry(name: str, info: Any, data_start: int) -> HeaderEntry:
    """One tensor's entry, checked as safetensors' `TensorInfo` deserializer and `Metadata::validate` check it."""
    if type(info) is not dict:
        raise _Refused(f"entry {_show(name)} is {type(info).__name__}, not an object with dtype, shape, data_offsets")
    missing = [field for field in _TENSOR_FIELDS if field not in info]
    if missing:
        raise _Refused(f"tensor {_show(name)} lacks {missing[0]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPE_SIZES:
        raise _Refused(f"tensor {_show(name)} has unsupported dtype {_show(dtype)}")
    if type(shape) is not list or not all(_is_u64(d) for d in shape):
        raise _Refused(f"tensor {_show(name)} has shape {_show(shape)}, not a list of non-negative integers")
    if type(offsets) is not list or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise _Refused(f"tensor {_show(name)} has data_offsets {_show(offsets)}, not two non-negative integers")
    if len(info) > len(_TENSOR_FIELDS):
        for key, value in info.items():
            if key not in _TENSOR_FIELDS:
                _check_unknown(value, 3)
    numel = 1
    for d in shape:  # safetensors multiplies with overflow checks, in order: [2**32, 2**32, 0] overflows
        numel *= d
        if numel > _U64_MAX:
            raise _Refused(f"tensor {_show(name)} has shape {_show(shape)}, whose element count overflows 64 bits")
    nbytes = numel * DTYPE_SIZES[dtype]
    if nbytes * 8 > _U64_MAX:
        raise _Refused(f"tensor {_show(name)} has shape {_show(shape)}, whose size in bits overflows 64 bits")
    begin, end = offsets
    if end - begin != nbytes:
        raise _Refused(f"tensor {_show(name)} spans {end - begin} bytes but its shape needs {nbytes}")
    return HeaderEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _tensor_limit(path: Path, tensors_before: int) -> tuple[int, str]:
    """How many tensors `path` may hold, and the limit's wording for the error."""
    left = MAX_TENSORS_PER_CHECKPOINT - tensors_before
    if left < MAX_TENSORS_PER_FILE:
        return max(left, 0), (f"{path.name} takes the checkpoint to more than {MAX_TENSORS_PER_CHECKPOINT:,} tensors, "
                              "qformat's limit per checkpoint")
    return MAX_TENSORS_PER_FILE, (f"{path.name} holds more than {MAX_TENSORS_PER_FILE:,} tensors, qformat's limit "
                                  "per file")


def read_header(path: Path, *, tensors_before: int = 0) -> SafetensorsHeader:
    """Parse and validate the header of `path` with the rules safetensors applies, and qformat's tensor limits.

    Refuses everything safetensors refuses (a header over MAX_HEADER_BYTES or past the file's end, JSON serde_json
    rejects: NaN, lone surrogates, numbers out of range, nesting past 127 levels, a duplicate field; a non-object
    `__metadata__` or non-string metadata values; offsets and dimensions that are not unsigned 64-bit integers; an
    element count that overflows; byte ranges that do not tile the data section exactly). qformat also refuses dtypes
    it has no size for, more than MAX_TENSORS_PER_FILE tensors, and more than MAX_TENSORS_PER_CHECKPOINT counting the
    `tensors_before` already read from the same checkpoint. The count is checked while parsing, so a huge header is
    refused before it is built in memory. A truncated file fails here, before any tensor is read.
    """
    raw, file_size = _read_header_bytes(path)
    data_start = 8 + len(raw)
    try:
        metadata, table = _split_header(path, raw, tensors_before)
        entries = [_entry(name, info, data_start) for name, info in table.items()]
    except _Refused as exc:
        raise _corrupt(path, str(exc)) from None
    _check_tiling(path, entries, data_start, file_size)
    return SafetensorsHeader(path, raw, data_start, file_size, metadata, {e.name: e for e in entries})


def _split_header(path: Path, raw: bytes, tensors_before: int) -> tuple[dict[str, str], dict[str, Any]]:
    """The header's `__metadata__` and its table of tensor entries (not yet checked one by one), once the JSON, the
    tensor count, the metadata types and the names' Unicode are checked."""
    limit, limit_text = _tensor_limit(path, tensors_before)
    too_many = CorruptCheckpointError(f"{limit_text}; a real model needs far fewer, so this file is damaged or "
                                      "crafted (re-download it)")
    try:
        table = _parse_json(raw, limit + 2)  # each tensor is one object, plus the root and __metadata__
    except _TooManyObjects:
        raise too_many from None
    if not isinstance(table, dict):
        raise _Refused("header is not a JSON object")
    if len(table) - ("__metadata__" in table) > limit:
        raise too_many
    metadata = table.pop("__metadata__", None)
    if metadata is None:  # serde reads `"__metadata__": null` as no metadata
        metadata = {}
    elif type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise _Refused(f"__metadata__ must map strings to strings, not {_show(metadata)}")
    if b"\\u" in raw:  # only an escape can produce a lone surrogate
        _check_unicode(table, "a tensor name")
        _check_unicode((*metadata, *metadata.values()), "__metadata__")
    return metadata, table


def _check_tiling(path: Path, entries: list[HeaderEntry], data_start: int, file_size: int) -> None:
    """The tensors' byte ranges, in offset order, must cover the data section exactly: no gap, no overlap."""
    cursor = data_start
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            raise _corrupt(path, f"tensor {_show(entry.name)} starts at byte {entry.start}, expected {cursor}")
        cursor = entry.end
    if cursor != file_size:
        raise _corrupt(path, f"tensor data ends at byte {cursor} but the file has {file_size} bytes")


# --- reading tensor bytes by offset -------------------------------------------------------------------------------

def _changed(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path.name} changed while it was read ({what}); make sure nothing else writes to "
                                  "it, re-download it if it is damaged, and run again")


def open_tensor_data(header: SafetensorsHeader) -> int:
    """Open `header.path` for positional reads (the caller closes the descriptor with `os.close`).

    Raises `CorruptCheckpointError` when the file no longer has the size its header was parsed from, so a file
    replaced or truncated since is caught before its bytes are trusted.
    """
    try:
        fd = os.open(header.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {header.path}: {exc.strerror or exc}") from None
    size = os.fstat(fd).st_size
    if size != header.file_size:
        os.close(fd)
        raise _changed(header.path, f"it is now {size:,} bytes, its header was read from {header.file_size:,}")
    return fd


def read_into(fd: int, path: Path, offset: int, buffer: memoryview) -> None:
    """Fill `buffer` with the bytes of the file at `offset` (positional reads: safe from several threads at once).

    Reading, unlike a memory map, cannot kill the process with SIGBUS when the file shrinks: a short read raises
    `CorruptCheckpointError` instead.
    """
    done, size = 0, len(buffer)
    while done < size:
        try:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [buffer[done:]], offset + done)
            else:
                chunk = os.pread(fd, size - done, offset + done)
                n = len(chunk)
                buffer[done : done + n] = chunk
        except OSError as exc:
            raise CorruptCheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
        if n == 0:
            raise _changed(path, f"it ends at byte {offset + done:,}, before the tensor data its header lists")
        done += n


def iter_tensor_chunks(fd: int, path: Path, entry: HeaderEntry, buffer: memoryview) -> Iterator[memoryview]:
    """The bytes of `entry`, read through `buffer` (reused: each chunk is valid until the next one is read)."""
    offset, end = entry.start, entry.end
    while offset < end:
        view = buffer[: min(len(buffer), end - offset)]
        read_into(fd, path, offset, view)
        yield view
        offset += len(view)


@dataclass(frozen=True)
class FileLayout:
    """Where every tensor of a file-to-be goes: the header bytes and each tensor's absolute byte range."""

    header: bytes
    entries: dict[str, HeaderEntry]

    @property
    def size(self) -> int:
        return max((e.end for e in self.entries.values()), default=len(self.header))


def layout_file(tensors: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> FileLayout:
    """Lay out a safetensors file for `tensors` exactly as the safetensors serializer would."""
    specs = sorted(tensors, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))
    if len({t.name for t in specs}) != len(specs):
        raise ValueError("duplicate tensor names in one file")
    body: dict[str, object] = {}
    if metadata:
        body["__metadata__"] = dict(metadata)
    offset = 0
    ranges: list[tuple[TensorSpec, int, int]] = []
    for spec in specs:
        ranges.append((spec, offset, offset + spec.nbytes))
        body[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors header would be {len(text)} bytes, above the {MAX_HEADER_BYTES} limit")
    header = struct.pack("<Q", len(text)) + text
    base = len(header)
    entries = {spec.name: HeaderEntry(spec.name, spec.dtype, spec.shape, base + a, base + b) for spec, a, b in ranges}
    return FileLayout(header, entries)
