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
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qformat.errors import CorruptCheckpointError
from qformat.spec.layout import DTYPE_SIZES, TensorSpec

__all__ = ["MAX_HEADER_BYTES", "FileLayout", "HeaderEntry", "SafetensorsHeader", "layout_file", "read_header"]

#: safetensors refuses headers above 100,000,000 bytes.
MAX_HEADER_BYTES = 100_000_000

# safetensors' `Dtype` enum order; files order tensors by dtype descending in this order, then by name.
_DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
                "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]  # fmt: skip
_DTYPE_RANK = {name: rank for rank, name in enumerate(_DTYPE_ORDER)}


@dataclass(frozen=True)
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


def _corrupt(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path.name} is not a valid safetensors file: {what}. Re-download or re-save it (the file may be truncated)"
    )


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of `path` with the same rules safetensors applies.

    Checks that the header fits the file, is a JSON object, names only dtypes with a known size, and that the tensor
    byte ranges tile the data section exactly (no gap, no overlap, nothing missing). A truncated file fails here, before
    any tensor is read.
    """
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"it is {file_size} bytes long, too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {length} exceeds safetensors' limit of {MAX_HEADER_BYTES}")
            if 8 + length > file_size:
                raise _corrupt(path, f"header says {length} bytes but the file has only {file_size - 8} after it")
            raw = fh.read(length)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_start = 8 + length
    entries: list[HeaderEntry] = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"entry {name!r} lacks dtype, shape or data_offsets") from None
        if dtype not in DTYPE_SIZES:
            raise _corrupt(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
            raise _corrupt(path, f"tensor {name!r} has a malformed shape or offsets")
        entry = HeaderEntry(name, dtype, shape, data_start + begin, data_start + end)
        if entry.nbytes != entry.numel * DTYPE_SIZES[dtype]:
            raise _corrupt(path, f"tensor {name!r} spans {entry.nbytes} bytes but its shape needs {entry.numel * DTYPE_SIZES[dtype]}")
        entries.append(entry)
    cursor = data_start
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            raise _corrupt(path, f"tensor {entry.name!r} starts at byte {entry.start}, expected {cursor}")
        cursor = entry.end
    if cursor != file_size:
        raise _corrupt(path, f"tensor data ends at byte {cursor} but the file has {file_size} bytes")
    return SafetensorsHeader(path, raw, data_start, file_size, metadata, {e.name: e for e in entries})


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
