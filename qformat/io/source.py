"""Read a source model's weights lazily, tensor by tensor.

safetensors files are memory-mapped and parsed with qformat's own strict header reader, so a tensor is a zero-copy
view of the file and its pages can be released (`madvise(MADV_DONTNEED)`) once it has been converted: resident
memory then follows the tensor being converted, not the file. The next tensor is announced with `MADV_WILLNEED` so
the kernel reads it from disk while the current one is being quantized. `.bin` checkpoints are only ever opened with
`torch.load(mmap=True, weights_only=True)`, which runs no pickled code and reads lazily too.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from qformat.errors import CorruptCheckpointError, SourceError
from qformat.io.dtypes import SAFETENSORS_CODES, TORCH_DTYPES, tensor_bytes
from qformat.io.index import read_weight_index
from qformat.io.paths import inside_root, link_root
from qformat.io.safetensors_format import HeaderEntry, read_header

__all__ = ["WEIGHT_FILE_SUFFIXES", "SourceCheckpoint", "SourceTensor", "TensorReader"]

#: Files that hold weights in some framework's format; they are never copied into a qformat checkpoint.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data",
                        ".ot", ".gguf", ".tflite", ".mlmodel", ".pb", ".keras", ".npz")  # fmt: skip

_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source checkpoint: where it lives and what it is."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class SourceCheckpoint:
    """The weight files of a local model folder and the table of every tensor in them, in file order.

    Weight files are found as transformers finds them: `model.safetensors.index.json`, then `model.safetensors`,
    then `pytorch_model.bin.index.json`, then `pytorch_model.bin`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index_file: str | None = None
        self.files: list[str] = []
        self.format = "safetensors"
        self._index_map: dict[str, str] | None = None
        self._headers: dict[str, dict[str, HeaderEntry]] = {}
        self._sizes: dict[str, int] = {}
        self.tensors: dict[str, SourceTensor] = {}
        self._discover()

    def _discover(self) -> None:
        folder = self.folder
        for index, single, fmt in (("model.safetensors.index.json", "model.safetensors", "safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin")):  # fmt: skip
            if (folder / index).is_file():
                self.index_file, self.format = index, fmt
                self.files = self._read_index(index)
                break
            if (folder / single).is_file():
                self.files, self.format = [single], fmt
                break
        else:
            raise SourceError(
                f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
            )
        root = link_root(folder)
        for file in self.files:
            if not inside_root(folder / file, root):
                raise SourceError(f"{file} in SOURCE is a symlink to a file outside SOURCE; qformat reads only weights "
                                  "inside the folder it is given: replace the link with the file itself")
        if self.format == "safetensors":
            self._table_from_safetensors()
        else:
            self._table_from_bin()

    def _read_index(self, index: str) -> list[str]:
        self._index_map, files = read_weight_index(self.folder, index)
        return files

    def _table_from_safetensors(self) -> None:
        index_map = self._index_map
        for file in self.files:
            header = read_header(self.folder / file, tensors_before=sum(map(len, self._headers.values())))
            self._headers[file] = header.tensors
            self._sizes[file] = header.file_size
            for entry in sorted(header.tensors.values(), key=lambda e: e.start):
                if index_map is not None and index_map.get(entry.name) != file:
                    continue  # transformers reads only what the index maps to this file
                self._add(SourceTensor(entry.name, file, entry.dtype, entry.shape, entry.nbytes))
        if index_map is not None:
            missing = [t for t in index_map if t not in self.tensors]
            if missing:
                raise CorruptCheckpointError(
                    f"{self.index_file} lists {missing[0]} in {index_map[missing[0]]}, but that file does not contain it; "
                    "re-download the model"
                )

    def _table_from_bin(self) -> None:
        for file in self.files:
            state = _load_bin(self.folder / file)
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor) or tensor.dtype not in SAFETENSORS_CODES:
                    continue
                self._add(SourceTensor(name, file, SAFETENSORS_CODES[tensor.dtype], tuple(tensor.shape),
                                       tensor.numel() * tensor.element_size()))
            del state

    def _add(self, tensor: SourceTensor) -> None:
        if tensor.name in self.tensors:
            raise CorruptCheckpointError(f"tensor {tensor.name} appears in two weight files; re-download the model")
        self.tensors[tensor.name] = tensor

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def numel(self) -> int:
        total = 0
        for t in self.tensors.values():
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    def readahead(self, limit: int) -> None:
        """Ask the kernel to start reading the first `limit` bytes of tensor data from disk in the background.

        Called before the (slow) model-structure analysis, so the disk works while transformers imports.
        """
        if self.format != "safetensors":
            return
        for file in self.files:
            if limit <= 0:
                return
            try:
                fd = os.open(self.folder / file, os.O_RDONLY)
            except OSError:
                return
            try:
                size = os.fstat(fd).st_size
                os.posix_fadvise(fd, 0, min(size, limit), os.POSIX_FADV_WILLNEED)
                limit -= size
            except (OSError, AttributeError):
                pass  # advice only
            finally:
                os.close(fd)

    def file_size(self, file: str) -> int:
        """The size of safetensors file `file` when its header was read."""
        return self._sizes[file]

    def header_entry(self, tensor: SourceTensor) -> HeaderEntry:
        return self._headers[tensor.file][tensor.name]

    @contextmanager
    def reader(self) -> Iterator[TensorReader]:
        reader = TensorReader(self)
        try:
            yield reader
        finally:
            reader.close()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle; all mean the same to the user
        raise CorruptCheckpointError(
            f"{path.name} cannot be read as a PyTorch checkpoint with weights_only=True ({type(exc).__name__}); "
            "re-download it or convert it to safetensors"
        ) from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path.name} does not hold a state dict; re-save the model with save_pretrained")
    return state


class TensorReader:
    """Zero-copy access to source tensors, with page release and read-ahead for safetensors files."""

    def __init__(self, checkpoint: SourceCheckpoint) -> None:
        self._ckpt = checkpoint
        self._maps: dict[str, mmap.mmap] = {}
        self._bins: dict[str, dict[str, torch.Tensor]] = {}

    def _map(self, file: str) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(self._ckpt.folder / file, "rb") as fh:
                size, expected = os.fstat(fh.fileno()).st_size, self._ckpt.file_size(file)
                if size != expected:  # a file replaced or cut since its header was read: mapping it could SIGBUS
                    raise CorruptCheckpointError(f"{file} changed while it was read (it is {size:,} bytes, its header "
                                                 f"was read from {expected:,}); rerun on a folder nothing writes to")
                # ACCESS_COPY: a private, writable mapping, so torch.frombuffer needs no copy; nothing is ever written.
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = mm
        return mm

    def _range(self, tensor: SourceTensor) -> tuple[mmap.mmap, int, int]:
        entry = self._ckpt.header_entry(tensor)
        return self._map(tensor.file), entry.start, entry.end

    def tensor(self, tensor: SourceTensor) -> torch.Tensor:
        """A torch view of the tensor's bytes (no copy for safetensors; an mmap-backed tensor for .bin)."""
        if self._ckpt.format == "bin":
            state = self._bins.get(tensor.file)
            if state is None:
                state = self._bins[tensor.file] = _load_bin(self._ckpt.folder / tensor.file)
            return state[tensor.name]
        mm, start, end = self._range(tensor)
        dtype = TORCH_DTYPES[tensor.dtype]
        if start == end:
            return torch.empty(tensor.shape, dtype=dtype)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=end - start, offset=start)
        return flat.view(dtype).reshape(tensor.shape)

    def raw(self, tensor: SourceTensor) -> memoryview:
        """The tensor's bytes as stored (little-endian, row-major), without copying where possible."""
        if self._ckpt.format == "bin":
            return tensor_bytes(self.tensor(tensor))
        mm, start, end = self._range(tensor)
        return memoryview(mm)[start:end]

    def prefetch(self, tensor: SourceTensor) -> None:
        """Ask the kernel to start reading `tensor` from disk now (no-op for .bin)."""
        if self._ckpt.format == "safetensors":
            mm, start, end = self._range(tensor)
            self._advise(mm, start, end, mmap.MADV_WILLNEED, inclusive=True)

    def release(self, tensor: SourceTensor) -> None:
        """Drop the tensor's pages from this process' memory (they stay in the page cache)."""
        if self._ckpt.format == "safetensors":
            mm, start, end = self._range(tensor)
            self._advise(mm, start, end, mmap.MADV_DONTNEED, inclusive=False)

    @staticmethod
    def _advise(mm: mmap.mmap, start: int, end: int, advice: int, *, inclusive: bool) -> None:
        if inclusive:  # cover every page the range touches
            lo, hi = start - start % _PAGE, min(len(mm), end + (-end % _PAGE))
        else:  # only pages entirely inside the range, so a neighbour's pages are left alone
            lo, hi = start + (-start % _PAGE), end - end % _PAGE
        if hi > lo:
            try:
                mm.madvise(advice, lo, hi - lo)
            except (OSError, ValueError):
                pass  # advice only

    def close(self) -> None:
        self._bins.clear()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a tensor view is still alive; the map closes when it is collected
        self._maps.clear()
