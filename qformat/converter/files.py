"""Copy every non-weight file of the source (tokenizer, generation config, sentence-transformers modules, ...)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qformat.errors import SourceError
from qformat.io.source import WEIGHT_FILE_SUFFIXES
from qformat.io.writer import write_error

__all__ = ["copy_support_files", "is_weight_file"]

_SKIP_DIRS = {".git", ".cache", ".huggingface"}
_WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".pt.index.json")
#: Files the converter writes itself.
_WRITTEN = {"config.json"}


def is_weight_file(relative: str) -> bool:
    """True for files that hold weights (in any framework's format) or index them."""
    name = relative.rsplit("/", 1)[-1]
    return name.endswith(WEIGHT_FILE_SUFFIXES) or name.endswith(_WEIGHT_INDEX_SUFFIXES)


def copy_support_files(source: Path, target: Path) -> tuple[list[str], list[str]]:
    """Copy the non-weight files of `source` into `target`, keeping the folder structure.

    Symlinks (the Hugging Face cache uses them) are followed, so the output holds real files. Returns the relative
    paths copied and the weight files left out.
    """
    copied: list[str] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(source, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlinked folder leading back up: walk it once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        rel_root = Path(root).relative_to(source)
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            if rel in _WRITTEN:
                continue
            if is_weight_file(rel):
                skipped.append(rel)
                continue
            dest = target / rel
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(root) / name, dest)
            except FileNotFoundError:
                raise SourceError(f"{rel} vanished from SOURCE while copying (a dangling link?); fix the source") from None
            except OSError as exc:
                raise write_error(dest, exc) from None
            copied.append(rel)
    return copied, skipped
