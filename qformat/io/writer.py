"""Streaming safetensors writer: header first, then each tensor's bytes at its offset as they are produced.

The file is created at its final size up front (`posix_fallocate` where the filesystem supports it), so a full disk or
a file-size limit fails before any work is done rather than halfway through. Each tensor is written through a
`TensorSink` that hashes what it writes (sha256 of the raw bytes, the content hash the format records; writers of
files that record no hashes, such as the compressed-tensors export, switch it off) and checks that exactly the
declared number of bytes arrived.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qformat.errors import WriteError
from qformat.io.safetensors_format import FileLayout, HeaderEntry

__all__ = ["ShardWriter", "TensorSink", "write_error", "write_json"]


def write_error(path: Path, exc: OSError) -> WriteError:
    """Turn an OSError from writing `path` into a one-line `WriteError` that says what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk is full; free space or choose another OUTPUT"
    elif exc.errno == errno.EFBIG:
        hint = "the file size limit was reached (disk full or ulimit -f); free space or raise the limit"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "permission denied; choose an OUTPUT you can write to"
    else:
        hint = exc.strerror or str(exc)
    return WriteError(f"could not write {path.name}: {hint}. Nothing was written to OUTPUT")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented UTF-8 JSON and flush it to disk (the folder is renamed into place right after)."""
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(path, exc) from None


class TensorSink:
    """Receives one tensor's bytes in order, writes them at the right offset and hashes them."""

    def __init__(self, writer: ShardWriter, entry: HeaderEntry) -> None:
        self._writer = writer
        self._entry = entry
        self._cursor = entry.start
        self._hash = hashlib.sha256() if writer.hashes else None

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self._cursor + view.nbytes > self._entry.end:
            raise ValueError(f"{self._entry.name}: more bytes than its header declares")
        self._writer.pwrite(view, self._cursor)
        if self._hash is not None:
            self._hash.update(view)
        self._cursor += view.nbytes

    def finish(self) -> str:
        """Check the tensor is complete and return its content hash ("sha256:<hex>"; "" when hashing is off)."""
        if self._cursor != self._entry.end:
            raise ValueError(f"{self._entry.name}: wrote {self._cursor - self._entry.start} of {self._entry.nbytes} bytes")
        self._writer.completed.add(self._entry.name)
        return "" if self._hash is None else "sha256:" + self._hash.hexdigest()


class ShardWriter:
    """One output safetensors file, laid out in advance by `layout_file`."""

    def __init__(self, path: Path, layout: FileLayout, *, hashes: bool = True) -> None:
        self.path = path
        self.layout = layout
        self.hashes = hashes
        self.completed: set[str] = set()
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise write_error(path, exc) from None
        try:
            self._reserve(layout.size)
            self.pwrite(memoryview(layout.header), 0)
        except BaseException:
            os.close(self._fd)
            raise

    def _reserve(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            if size and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(self._fd, 0, size)
                except OSError as exc:  # filesystems without fallocate support: the ftruncate above stands
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def pwrite(self, view: memoryview, offset: int) -> None:
        try:
            while view.nbytes:
                done = os.pwrite(self._fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def sink(self, name: str) -> TensorSink:
        return TensorSink(self, self.layout.entries[name])

    def close(self, *, sync: bool = True) -> None:
        """Check every tensor was written, flush to disk and close."""
        try:
            missing = set(self.layout.entries) - self.completed
            if missing:
                raise ValueError(f"{self.path.name}: tensors never written: {sorted(missing)[:5]}")
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        finally:
            self.abort()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
