"""Atomic output folders: build in a hidden temporary folder beside OUTPUT, rename into place only when complete.

An interrupted or failed run (exception, Ctrl-C, SIGTERM, full disk) removes the temporary folder and any parent
folders it had to create, so nothing is left beside OUTPUT and an existing OUTPUT is untouched. With `overwrite`,
the old OUTPUT is moved aside, the new one renamed in, and only then is the old one deleted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qformat.errors import OutputError, WriteError

__all__ = ["TEMP_MARKER", "atomic_output_dir", "check_output_location"]

#: Temporary folders are named ".<OUTPUT name>.qformat-tmp-<random>" beside OUTPUT.
TEMP_MARKER = ".qformat-tmp-"


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_location(output: Path, *, source: Path | None, overwrite: bool) -> None:
    """Refuse an OUTPUT that would clobber data: an existing path without `overwrite`, or one inside SOURCE.

    Also refuses an OUTPUT that contains SOURCE (overwriting it would delete the source) and an OUTPUT that is a file.
    """
    out = output.resolve()
    if source is not None:
        src = source.resolve()
        if _is_within(out, src):
            raise OutputError(f"OUTPUT {output} lies inside SOURCE {source}; write it somewhere else (sources are never modified)")
        if _is_within(src, out):
            raise OutputError(f"OUTPUT {output} contains SOURCE {source}; choose an OUTPUT outside the source")
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise OutputError(f"OUTPUT {output} exists and is not a folder; remove it or choose another OUTPUT")
        if not overwrite:
            raise OutputError(f"OUTPUT {output} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(output: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it becomes `output`, on any exception it disappears."""
    output = Path(os.path.abspath(output))
    created: list[Path] = []
    parent = output.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = output.parent / f".{output.name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}"
    old: Path | None = None
    try:
        try:
            for folder in reversed(created):
                folder.mkdir()
            tmp.mkdir()
        except OSError as exc:
            raise WriteError(f"cannot create {tmp.parent}: {exc.strerror}; choose an OUTPUT you can write to") from None
        yield tmp
        if output.exists():
            if not overwrite:
                raise OutputError(f"OUTPUT {output} appeared while converting; pass --overwrite to replace it")
            old = output.parent / f".{output.name}.qformat-old-{uuid.uuid4().hex[:12]}"
            os.rename(output, old)
        os.rename(tmp, output)
        _fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not output.exists():
            os.rename(old, output)
            old = None
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
