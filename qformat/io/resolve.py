"""Resolve SOURCE to a local model folder: a folder on disk, or a Hub repo id downloaded with huggingface_hub.

The provenance recorded for a source never contains a local path: a Hub source is recorded as repo id + the commit
it resolved to; a local folder as nothing but what `--base-model` says (or, for a folder inside the Hugging Face
cache, the repo id and commit the cache layout names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qformat.errors import SourceError
from qformat.io.atomic import check_output_location
from qformat.io.paths import CACHE_SNAPSHOT

__all__ = ["HUB_IGNORE_PATTERNS", "ResolvedSource", "resolve_source", "resolve_source_for"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

#: Weight formats other than safetensors/bin are never needed to convert, so they are not downloaded.
HUB_IGNORE_PATTERNS = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot", "*.gguf", "*.tflite", "*.mlmodel",
                       "openvino/*", "onnx/*", "coreml/*", "*.ckpt"]  # fmt: skip


@dataclass(frozen=True)
class ResolvedSource:
    """A local folder to read, plus what may be published about where it came from."""

    path: Path
    repo_id: str | None
    revision: str | None


def _from_cache_layout(path: Path) -> tuple[str | None, str | None]:
    match = CACHE_SNAPSHOT.search(path.resolve().as_posix())
    if not match:
        return None, None
    return f"{match['owner']}/{match['name']}", match["rev"]


def resolve_source(source: str | Path, *, revision: str | None = None) -> ResolvedSource:
    """Find or download SOURCE. A path that exists is used as is; otherwise a repo id is fetched from the Hub."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"SOURCE {source} is a file; point it at the model folder that holds config.json")
        if not (path / "config.json").is_file():
            raise SourceError(
                f"{source} is not a Hugging Face model folder: it has no config.json. "
                "Point SOURCE at the folder that holds config.json and the weights"
            )
        repo_id, rev = _from_cache_layout(path)
        return ResolvedSource(path, repo_id, rev)
    text = str(source)
    if not _REPO_ID.match(text):
        raise SourceError(f"SOURCE {source} does not exist; give a model folder or a Hub repo id such as owner/name")
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=HUB_IGNORE_PATTERNS))
    except GatedRepoError:
        raise SourceError(f"{repo_id} is gated; accept its terms on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"SOURCE {repo_id} is neither a local folder nor a Hub repo you can read; check the name, or log in "
            "(hf auth login) for a private repo"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"revision {revision!r} does not exist in {repo_id}; give a branch, tag or commit") from None
    except LocalEntryNotFoundError:
        raise SourceError(
            f"SOURCE {repo_id} is not a local folder and is not in the Hugging Face cache, and downloading is off "
            "(HF_HUB_OFFLINE) or the Hub is unreachable; download it first or give a local folder"
        ) from None
    except HfHubHTTPError as exc:
        raise SourceError(f"downloading {repo_id} failed: {exc.server_message or exc}; try again later") from None
    except OSError as exc:
        raise SourceError(f"downloading {repo_id} failed: {exc}; check your network and disk space") from None
    commit = folder.name if _COMMIT.match(folder.name) else revision
    if not (folder / "config.json").is_file():
        raise SourceError(f"Hub repo {repo_id} has no config.json at its root; it is not a transformers model")
    return ResolvedSource(folder, repo_id, commit)


def resolve_source_for(source: str | Path, output: Path, *, revision: str | None, overwrite: bool) -> ResolvedSource:
    """`resolve_source` for a command that writes OUTPUT: the output location is checked before a possible download
    (so a bad OUTPUT fails fast) and again against the folder SOURCE resolved to (OUTPUT must not be inside it)."""
    local = Path(source).expanduser()
    check_output_location(output, source=local if local.exists() else None, overwrite=overwrite)
    resolved = resolve_source(source, revision=revision)
    check_output_location(output, source=resolved.path, overwrite=overwrite)
    return resolved
