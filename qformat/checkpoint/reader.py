"""Open a qformat checkpoint folder: its config, its weight files and the table of every tensor in them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformat.errors import CorruptCheckpointError, FormatError
from qformat.io.index import INDEX_FILE, read_weight_index
from qformat.io.jsonfile import load_json
from qformat.io.paths import inside_root, link_root
from qformat.io.safetensors_format import HeaderEntry, SafetensorsHeader, open_tensor_data, read_header, read_into
from qformat.spec._typed import list_at, str_at
from qformat.spec.config import CheckpointConfig
from qformat.spec.layout import QUANTIZED_MARKER

__all__ = ["QFormatCheckpoint", "format_errors", "open_checkpoint"]

_SINGLE = "model.safetensors"
_MARKER = "." + QUANTIZED_MARKER
# safetensors allows dimensions up to 2**64 - 1 (in a zero-size tensor); torch sizes are signed 64-bit.
_TORCH_MAX_DIM = 2**63 - 1


@dataclass(frozen=True)
class QFormatCheckpoint:
    """A parsed checkpoint: `config` is config.json, `qconfig` its quantization_config, `tensors` maps every tensor
    name to the file (relative) and header entry holding it."""

    folder: Path
    config: dict[str, Any]
    qconfig: CheckpointConfig
    files: tuple[str, ...]
    index: dict[str, str] | None
    headers: dict[str, SafetensorsHeader]
    tensors: dict[str, tuple[str, HeaderEntry]]

    @property
    def quantized_modules(self) -> list[str]:
        """Modules that store quantized tensors (they have a `weight_scale`), in file order."""
        return [name[: -len(_MARKER)] for name in self.tensors if name.endswith(_MARKER)]

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for _, entry in self.tensors.values())

    def entry(self, name: str) -> HeaderEntry | None:
        found = self.tensors.get(name)
        return None if found is None else found[1]

    def weight_shape(self, module: str) -> tuple[int, ...]:
        """The dense shape of quantized `module`, [out, in] in a checkpoint that verifies: its `weight`'s, or what a
        2:4 module's `shape` tensor records (it stores no `weight`)."""
        entry = self.entry(f"{module}.weight")
        if entry is not None:
            return entry.shape
        return tuple(int(v) for v in self.load(f"{module}.shape").reshape(-1).tolist())

    def structure(self):  # -> qformat.models.structure.ModelStructure
        """The model's Linear modules (built on the meta device from config.json), with each quantized module's
        dense shape; raises `UnsupportedModelError` where the installed transformers cannot build it."""
        from qformat.models.structure import analyze_structure

        shapes = {name: entry.shape for name, (_, entry) in self.tensors.items()}
        for module in self.quantized_modules:  # a 2:4 module stores no .weight: present the dense weight it means
            if f"{module}.weight" not in shapes and f"{module}.shape" in shapes:
                shapes[f"{module}.weight"] = self.weight_shape(module)
        quantized = set(self.quantized_modules)
        full_precision = {name: entry.dtype for name, (_, entry) in self.tensors.items()
                          if name.rpartition(".")[0] not in quantized}
        return analyze_structure(self.folder, shapes, quantized=True, full_precision=full_precision)

    def load(self, name: str):  # -> torch.Tensor
        """Read one tensor (a copy in fresh memory) from the byte range its already-parsed header gives.

        The file is not parsed again (safetensors' `safe_open` would re-read the whole header for every tensor) nor
        memory-mapped (a file that shrinks would kill the process with SIGBUS); a file that changed since its header
        was read raises `FormatError`.
        """
        import torch

        from qformat.io.dtypes import TORCH_DTYPES

        file, entry = self.tensors[name]
        if any(d > _TORCH_MAX_DIM for d in entry.shape):
            raise FormatError(f"{name}: shape {list(entry.shape)} has a dimension torch cannot represent")
        data = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            with format_errors():
                fd = open_tensor_data(self.headers[file])
                try:
                    read_into(fd, self.headers[file].path, entry.start, memoryview(data.numpy()))
                finally:
                    os.close(fd)
        return data.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)


@contextmanager
def format_errors() -> Iterator[None]:
    """Report a weight file that cannot be read, or changed since its header was parsed, as a `FormatError`."""
    try:
        yield
    except CorruptCheckpointError as exc:
        raise FormatError(str(exc)) from None


def _read_config(folder: Path) -> tuple[dict[str, Any], CheckpointConfig]:
    """config.json (read with the untrusted-JSON limits) and its parsed quantization_config; the top-level keys
    qformat's tools read (`architectures`, `model_type`, `dtype`) must have their JSON types."""
    path = folder / "config.json"
    if not path.is_file():
        raise FormatError(f"{folder} has no config.json; it is not a model folder")
    config = load_json(path, error=FormatError)
    if not isinstance(config, dict) or "quantization_config" not in config:
        raise FormatError("config.json has no quantization_config; this is not a qformat checkpoint")
    for i, arch in enumerate(list_at(config.get("architectures"), "config.json architectures", nullable=True) or []):
        str_at(arch, f"config.json architectures[{i}]")
    for key in ("model_type", "dtype", "torch_dtype"):
        str_at(config.get(key), f"config.json {key}", nullable=True)
    return config, CheckpointConfig.from_dict(config["quantization_config"])


def _weight_files(folder: Path) -> tuple[tuple[str, ...], dict[str, str] | None]:
    if (folder / INDEX_FILE).is_file():
        with format_errors():
            weight_map, files = read_weight_index(folder, INDEX_FILE)
        return tuple(files), weight_map
    if (folder / _SINGLE).is_file():
        return (_SINGLE,), None
    raise FormatError(f"{folder} has neither {_SINGLE} nor {INDEX_FILE}")


def open_checkpoint(folder: str | Path) -> QFormatCheckpoint:
    """Parse config.json, the index (if any) and every weight file's header; raise `FormatError` on the first problem.

    Checks here are structural (the files exist, headers are valid, the index agrees with the files); `verify` adds
    the per-module and per-value checks.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder")
    config, qconfig = _read_config(folder)
    files, index = _weight_files(folder)
    headers: dict[str, SafetensorsHeader] = {}
    tensors: dict[str, tuple[str, HeaderEntry]] = {}
    root = link_root(folder)
    for file in files:
        if not inside_root(folder / file, root):
            raise FormatError(f"{file} is a symlink to a file outside {folder}; qformat reads only weights inside the "
                              "checkpoint folder: replace the link with the file itself")
        with format_errors():
            header = read_header(folder / file, tensors_before=len(tensors))
        headers[file] = header
        for entry in sorted(header.tensors.values(), key=lambda e: e.start):
            if entry.name in tensors:
                raise FormatError(f"tensor {entry.name} is stored in both {tensors[entry.name][0]} and {file}")
            if index is not None and index.get(entry.name) != file:
                raise FormatError(f"{file} holds {entry.name}, but {INDEX_FILE} maps it to {index.get(entry.name)}")
            tensors[entry.name] = (file, entry)
    if index is not None:
        for name, file in index.items():
            if name not in tensors:
                raise FormatError(f"{INDEX_FILE} maps {name} to {file}, which does not contain it")
    return QFormatCheckpoint(folder, config, qconfig, files, index, headers, tensors)
