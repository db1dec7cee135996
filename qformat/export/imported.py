"""What every `qformat import` shares, whatever the source format: the provenance and statistics an imported
checkpoint records (docs/FORMAT.md section 11.3), and writing it atomically, verified before it is renamed into
place. The format-specific importers (compressed-tensors, bitsandbytes) plan and stream the tensors."""

from __future__ import annotations

import math
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from qformat._version import __version__
from qformat.errors import FormatError
from qformat.io.atomic import atomic_output_dir
from qformat.io.dtypes import SAFETENSORS_CODES, tensor_bytes
from qformat.io.index import write_weight_index
from qformat.io.safetensors_format import SHARD_METADATA, layout_file
from qformat.io.source import SourceCheckpoint, SourceTensor, TensorReader
from qformat.io.support_files import copy_support_files
from qformat.io.writer import ShardWriter, write_json
from qformat.plan.record import environment
from qformat.spec.config import CheckpointConfig, FallbackEntry
from qformat.spec.fused import fused_groups_for
from qformat.spec.layout import TensorSpec
from qformat.spec.schemes import Scheme, scheme_name_for

if TYPE_CHECKING:
    from qformat.models.structure import ModelStructure

__all__ = ["ImportResult", "import_parameters", "import_provenance", "import_statistics", "imported_config",
           "write_checked", "write_import_shards", "write_imported"]


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote."""

    output: Path
    quantized_modules: int
    fallback_modules: int
    schemes: dict[str, int]  # scheme name -> modules
    sparse_modules: list[str]  # modules stored 2:4 compressed
    checkpoint_bytes: int


class ImportedModule(Protocol):
    """What `import_parameters` needs of a planned module."""

    out_features: int
    in_features: int

    @property
    def source_tensors(self) -> tuple[str, ...]: ...


M = TypeVar("M", bound=ImportedModule)


def import_parameters(modules: Iterable[ImportedModule], ckpt: SourceCheckpoint) -> int:
    """The model's parameter count: each imported module's weight as its full shape, plus every tensor the import
    does not replace."""
    modules = list(modules)
    replaced = {name for m in modules for name in m.source_tensors}
    total = sum(m.out_features * m.in_features for m in modules)
    return total + sum(math.prod(t.shape) for t in ckpt.tensors.values() if t.name not in replaced)


def write_checked(writer: ShardWriter, name: str, value: torch.Tensor | memoryview, hashes: dict[str, str]) -> None:
    """Write one planned tensor (bytes kept as read, or a tensor), refusing one whose size or dtype is not what the
    layout planned for it: the source contradicts its own headers."""
    entry = writer.layout.entries[name]
    raw = isinstance(value, memoryview)
    got = value.nbytes if raw else value.numel() * value.element_size()
    if got != entry.nbytes or (not raw and SAFETENSORS_CODES[value.dtype] != entry.dtype):
        raise FormatError(f"{name} does not have the shape qformat stores it with ({entry.dtype} "
                          f"{list(entry.shape)}); the source is inconsistent")
    sink = writer.sink(name)
    sink.write(value if raw else tensor_bytes(value))
    hashes[name] = sink.finish()


def write_import_shards(ckpt: SourceCheckpoint, reader: TensorReader, folder: Path, modules: Iterable[M], *,
                        home: Callable[[M], str], specs: Callable[[M], list[TensorSpec]],
                        data: Callable[[M], Mapping[str, torch.Tensor | memoryview]],
                        release: Callable[[M], Iterable[SourceTensor]] = lambda m: ()) -> tuple[dict[str, str],
                                                                                            dict[str, str]]:
    """Write one output shard per source shard: the source tensors no module replaces, bytes as read, then each
    module's tensors (`data(m)`, checked against `specs(m)`) in the shard of its `home(m)` file, releasing the pages
    of `release(m)` after each. Returns (tensor -> content hash, tensor -> file)."""
    modules = list(modules)
    replaced = {name for m in modules for name in m.source_tensors}
    hashes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    for file in ckpt.files:
        kept = [t for t in ckpt.tensors.values() if t.file == file and t.name not in replaced]
        here = [m for m in modules if home(m) == file]
        layout = [TensorSpec(t.name, t.dtype, t.shape) for t in kept]
        for m in here:
            layout += specs(m)
        writer = ShardWriter(folder / file, layout_file(layout, SHARD_METADATA))
        try:
            for t in kept:
                sink = writer.sink(t.name)
                sink.write(reader.raw(t))
                hashes[t.name] = sink.finish()
                reader.release(t)
            for m in here:
                for name, value in data(m).items():
                    write_checked(writer, name, value, hashes)
                for t in release(m):
                    reader.release(t)
            writer.close(sync=True)
        finally:
            writer.abort()
        weight_map.update(dict.fromkeys((s.name for s in layout), file))
    return hashes, weight_map


def import_provenance(ckpt: SourceCheckpoint, *, repo_id: str | None, revision: str | None,
                      base_model: str | None, parameters: int, imported_from: Mapping[str, Any],
                      hashes: Mapping[str, str]) -> dict[str, Any]:
    """`provenance` of an imported checkpoint: the `qformat import` command, the source (whose full-precision size
    is unknown: `bytes` null) and what it was imported from."""
    command = ["qformat", "import", repo_id or base_model or "SOURCE", "OUTPUT"]
    if revision:
        command += ["--revision", revision]
    if base_model and base_model != repo_id:
        command += ["--base-model", base_model]
    return {
        "qformat_version": __version__,
        "environment": environment(),
        "source": {"repo_id": repo_id, "revision": revision, "base_model": base_model, "format": ckpt.format,
                   "parameters": parameters, "bytes": None},
        "options": {"import": True, "revision": revision, "base_model": base_model},
        "command": shlex.join(command),
        "imported_from": dict(imported_from, bytes=ckpt.nbytes),
        "tensor_hashes": dict(sorted(hashes.items())),
    }


def import_statistics(linear_modules: int, schemes: Mapping[str, str], nbytes: int) -> dict[str, Any]:
    """`statistics` of an imported checkpoint (`schemes`: quantized module -> scheme name). The weight error is
    unknown: the full-precision weights were never in the source."""
    return {"linear_modules": linear_modules, "quantized_modules": len(schemes), "checkpoint_bytes": nbytes,
            "modules": {m: {"scheme": name, "observer": None, "rel_error": None} for m, name in schemes.items()}}


def imported_config(schemes: Mapping[str, Scheme], *, structure: ModelStructure,
                    fallback: Iterable[FallbackEntry], provenance: dict[str, Any], nbytes: int,
                    outlier_threshold: float | None = None) -> CheckpointConfig:
    """`quantization_config` of an imported checkpoint whose quantized modules carry `schemes` (module -> scheme):
    the most common scheme is the default, every other module an override; checked to say exactly that."""
    names = {m: scheme_name_for(scheme) for m, scheme in schemes.items()}
    default = Counter(names.values()).most_common(1)[0][0]
    config = CheckpointConfig(
        schemes={scheme_name_for(scheme): scheme for scheme in schemes.values()}, default_scheme=default,
        overrides=tuple((m, n) for m, n in names.items() if n != default), fallback=tuple(fallback),
        fused_groups=fused_groups_for(structure.model_type), provenance=provenance,
        statistics=import_statistics(len(structure.linears), names, nbytes), outlier_threshold=outlier_threshold)
    for module, name in names.items():  # the config must say exactly what the import decided
        assert config.scheme_for(module) == (name, schemes[module]), module
    return config


def write_imported(source: Path, ckpt: SourceCheckpoint, out: Path, *, overwrite: bool, config: Mapping[str, Any],
                   write_shards: Callable[[Path], tuple[dict[str, str], dict[str, str]]],
                   quantization_config: Callable[[dict[str, str], int], CheckpointConfig]) -> int:
    """Write the imported checkpoint to `out` atomically and return its bytes: support files, the shards
    (`write_shards(folder) -> (tensor hashes, weight map)`), config.json (`config`, the source's without its
    quantization keys, plus `quantization_config(hashes, nbytes)`); `qformat verify` must pass before the rename."""
    from qformat.checkpoint.verify import verify

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        copy_support_files(source, tmp)
        hashes, weight_map = write_shards(tmp)
        nbytes = sum((tmp / f).stat().st_size for f in ckpt.files)
        if ckpt.index_file is not None:
            write_weight_index(tmp, weight_map, nbytes)
        written = dict(config)
        written["quantization_config"] = quantization_config(hashes, nbytes).to_dict()
        write_json(tmp / "config.json", written)
        try:
            verify(tmp, check_hashes=False)
        except FormatError as exc:
            raise FormatError(f"the imported checkpoint does not verify ({exc}); the source is inconsistent "
                              "or this is a qformat bug (please report it)") from None
    return nbytes
