"""The `*.index.json` of a sharded checkpoint: which file holds each tensor, checked to stay inside the folder."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from qformat.errors import CorruptCheckpointError
from qformat.io import safetensors_format
from qformat.io.jsonfile import INDEX_MAX_BYTES, load_json
from qformat.io.writer import write_json

__all__ = ["INDEX_FILE", "read_weight_index", "write_weight_index"]

#: The index file name transformers reads for a sharded safetensors checkpoint.
INDEX_FILE = "model.safetensors.index.json"


def read_weight_index(folder: Path, index: str) -> tuple[dict[str, str], list[str]]:
    """Parse `folder/index` and return (tensor -> file, files in first-mention order).

    The file is read with the untrusted-JSON limits of `load_json` and may map at most
    `MAX_TENSORS_PER_CHECKPOINT` tensors. Every file must be named relative to the folder without `..` (checked
    lexically: symlinks, as in the Hugging Face cache, are fine) and must exist. Raises `CorruptCheckpointError`
    naming the first problem.
    """
    data = load_json(folder / index, error=CorruptCheckpointError, max_bytes=INDEX_MAX_BYTES,
                     what="re-download or re-save the model")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index} is not a valid index (it needs a 'weight_map' of tensor -> file); "
                                     "re-download or re-save the model")
    if not isinstance(data.get("metadata", {}), dict):  # transformers reads it as an object (TypeError otherwise)
        raise CorruptCheckpointError(f"{index}: 'metadata' must be a JSON object; re-download or re-save the model")
    limit = safetensors_format.MAX_TENSORS_PER_CHECKPOINT
    if len(weight_map) > limit:
        raise CorruptCheckpointError(f"{index} maps more than {limit:,} tensors, qformat's limit per checkpoint; "
                                     "a real model needs far fewer, so the index is damaged or crafted (re-download it)")
    files: dict[str, None] = {}  # insertion-ordered set: first-mention order, O(1) lookups
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CorruptCheckpointError(f"{index} maps {tensor!r} to {name!r}, not a file name; re-download the model")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or "\\" in name:
            raise CorruptCheckpointError(
                f"{index} names the weight file {name!r}, which lies outside the model folder; fix or re-download it"
            )
        if name not in files:
            if not (folder / rel).is_file():
                raise CorruptCheckpointError(f"{index} names {name}, which does not exist in the model folder")
            files[name] = None
    return dict(weight_map), list(files)


def write_weight_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write `folder`'s INDEX_FILE: total size of the weight files and tensor -> file, sorted by tensor name."""
    write_json(folder / INDEX_FILE,
               {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
