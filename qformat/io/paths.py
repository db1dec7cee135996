"""Where a folder's symlinks may point: the one rule for "inside the folder qformat was given".

Model folders come from strangers. A link inside one may point anywhere (a token file, /etc, the folder's parent),
so every reader and copier asks `inside_root` before following one. The trusted root is the folder itself, or, for a
snapshot in the Hugging Face cache (whose files are links into `../../blobs`), the repo's cache folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["CACHE_SNAPSHOT", "inside_root", "link_root"]

#: A snapshot folder of the Hugging Face cache: `.../models--<owner>--<name>/snapshots/<40-hex commit>`.
CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})$")


def link_root(path: Path) -> Path:
    """The folder a symlink inside `path` may point into (resolved): `path` itself, or for a snapshot in the Hugging
    Face cache the repo's cache folder, `models--<owner>--<name>`."""
    real = Path(path).resolve()
    if CACHE_SNAPSHOT.search(real.as_posix()):
        return real.parent.parent
    return real


def inside_root(path: Path, root: Path) -> bool:
    """True if `path`, with every link resolved, lies inside the resolved folder `root`."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))
