"""Copy every non-weight file of the source (tokenizer, generation config, sentence-transformers modules, ...).

Only regular files that lie inside SOURCE are copied. A SOURCE is untrusted (downloaded from strangers), so links to
folders are never walked into, and these are refused with one line naming them: a symlink to a folder outside SOURCE
(`up -> ..`, /etc/ssl), a symlink to a file outside SOURCE (a stored token), a dangling link, and anything that is
not a regular file (a pipe, a device). A link to a folder inside SOURCE is not entered (its files are copied from
where they lie); a symlink to a file inside SOURCE is copied as the file it names. For a snapshot in the Hugging Face
cache, whose files are all links into the repo's blobs folder, "inside" means inside the repo's cache folder
(`link_root`).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from qformat.errors import SourceError
from qformat.io.paths import link_root
from qformat.io.source import WEIGHT_FILE_SUFFIXES
from qformat.io.writer import write_error

__all__ = ["copy_support_files", "is_weight_file"]

_SKIP_DIRS = {".git", ".cache", ".huggingface"}
_WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".pt.index.json")
#: Files the converter writes itself.
_WRITTEN = {"config.json"}
_FIX = "qformat copies only regular files that lie inside SOURCE"


def is_weight_file(relative: str) -> bool:
    """True for files that hold weights (in any framework's format) or index them."""
    name = relative.rsplit("/", 1)[-1]
    return name.endswith(WEIGHT_FILE_SUFFIXES) or name.endswith(_WEIGHT_INDEX_SUFFIXES)


def copy_support_files(source: Path, target: Path, *, root: Path | None = None) -> tuple[list[str], list[str]]:
    """Copy the non-weight files of `source` into `target`, keeping the folder structure; return the relative paths
    copied and the weight files left out.

    `root` is the folder symlinked files may point into (default: `link_root(source)`); what they name is copied as a
    regular file. Links to folders are never followed.

    Raises:
        SourceError: a link to a folder outside `source`, a link to a file outside `root`, a dangling link, or a file
            that is not a regular file (named in the message).
    """
    source = Path(source)
    trusted = Path(os.path.realpath(root if root is not None else link_root(source)))
    copied: list[str] = []
    skipped: list[str] = []
    for rel in _walk(source, Path(os.path.realpath(source))):
        if rel in _WRITTEN:
            continue
        if is_weight_file(rel):
            skipped.append(rel)
            continue
        dest = target / rel
        data = _regular_file(source / rel, rel, trusted)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _copy(data, rel, dest)
        except OSError as exc:
            raise write_error(dest, exc) from None
        copied.append(rel)
    return copied, skipped


def _walk(source: Path, real_source: Path) -> list[str]:
    """Every file under `source` (relative, sorted), without following links to folders.

    A link to a folder inside SOURCE is not entered (what it names is copied from where it lies, once, and a loop
    such as `extra/loop -> ..` ends there); a link to a folder anywhere else is refused.
    """
    found: list[str] = []
    for root, dirs, files in os.walk(source):  # followlinks=False: a linked folder is listed, never entered
        rel_root = Path(root).relative_to(source)
        for name in dirs:
            path = os.path.join(root, name)
            if os.path.islink(path) and not Path(os.path.realpath(path)).is_relative_to(real_source):
                raise SourceError(f"{(rel_root / name).as_posix()} in SOURCE is a symlink to a folder outside SOURCE; "
                                  f"{_FIX}: replace it with a real folder or remove it")
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not os.path.islink(os.path.join(root, d)))
        found += [(rel_root / name).as_posix() for name in sorted(files)]
    return found


def _regular_file(path: Path, rel: str, trusted: Path) -> Path:
    """The path to read for `rel`: the file itself, or the target of a link that stays inside `trusted`."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise SourceError(f"{rel} vanished from SOURCE while copying; run again on a source nothing else modifies") \
            from None
    if stat.S_ISLNK(mode):
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(trusted):
            raise SourceError(f"{rel} in SOURCE is a symlink to a file outside SOURCE; {_FIX}: replace the link with "
                              "the file itself or remove it")
        try:
            mode = os.stat(real).st_mode
        except OSError:
            raise SourceError(f"{rel} in SOURCE is a dangling symlink; remove it or restore the file it names") \
                from None
        path = real
    if not stat.S_ISREG(mode):
        raise SourceError(f"{rel} in SOURCE is not a regular file (a pipe, socket or device); {_FIX}: remove it")
    return path


def _copy(path: Path, rel: str, dest: Path) -> None:
    """Copy the regular file at `path` (no symlink in its last component) to the new file `dest`. It is opened
    without following a link and without blocking, and checked again once open, so that a file swapped for a link or
    a pipe after the checks is refused rather than followed or waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceError(f"{rel} vanished from SOURCE while copying; run again on a source nothing else modifies") \
            from None
    except OSError as exc:
        if os.path.islink(path):
            raise SourceError(f"{rel} in SOURCE changed into a symlink while copying; {_FIX}") from None
        raise SourceError(f"cannot read {rel} in SOURCE: {exc.strerror}; check its permissions") from None
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise SourceError(f"{rel} in SOURCE is not a regular file (a pipe, socket or device); {_FIX}: remove it")
        os.set_blocking(fin.fileno(), True)
        with open(dest, "xb") as fout:
            shutil.copyfileobj(fin, fout)
