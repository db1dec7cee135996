"""`qformat verify`: check a checkpoint against docs/FORMAT.md and name the first problem.

Checks, in order: config and version; weight files, headers and index agree; every quantized module stores exactly
the tensors its scheme needs with the right dtypes and shapes, meets the shape rules, and is not also in the
fallback list; fallback modules store plain float weights; scales are finite and positive; fp8 values hold no NaN;
2:4 bitmasks keep exactly two of every four; the statistics name the same modules; the model (built on the meta
device from config.json) has no Linear module that is neither quantized nor in the fallback list; and, if hashes
are recorded, every tensor is present and its bytes hash as recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qformat.checkpoint.reader import QFormatCheckpoint, format_errors, open_checkpoint
from qformat.errors import FormatError
from qformat.io.safetensors_format import iter_tensor_chunks, open_tensor_data
from qformat.quantize.observers import SCALE_PROBLEM, fp8_has_nan, scales_valid
from qformat.quantize.sparse24 import bitmask_problem
from qformat.spec.layout import (
    FULL_PRECISION_DTYPES,
    SCALE_SUFFIXES,
    VALUE_DTYPES,
    TensorSpec,
    module_tensors,
    shape_problem,
    stored_tensors_problem,
)

__all__ = ["VerifyReport", "verify"]

# Bytes read per step when hashing a tensor: large enough that sha256 runs without the GIL, small enough per thread.
_HASH_CHUNK = 8 * 2**20
# Most tensors hashed in one task (many tiny tensors would otherwise cost one thread hand-off each).
_HASH_BATCH = 1024


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` checked (it raises on the first problem, so a report means the checkpoint passed).

    `linear_modules` is the number of Linear modules of the model, each found quantized or in the fallback list;
    None when the installed transformers cannot build the architecture (`structure_note` says why).
    """

    folder: Path
    tensors: int
    quantized_modules: int
    fallback_modules: int
    hashes_checked: int
    linear_modules: int | None = None
    structure_note: str = ""
    format_version: int = 1


def _fail(where: str, problem: str) -> FormatError:
    return FormatError(f"{where}: {problem}")


def _expected_tensors(ckpt: QFormatCheckpoint, module: str) -> list[TensorSpec]:
    resolved = ckpt.qconfig.scheme_for(module)
    if resolved is None:
        raise _fail(module, "is in the fallback list but stores quantized tensors (weight_scale)")
    name, scheme = resolved
    if scheme.sparsity is None:
        weight = ckpt.entry(f"{module}.weight")
        if weight is None or len(weight.shape) != 2:
            raise _fail(module, f"scheme {name} needs a 2-D {module}.weight")
        out_f, in_f = weight.shape
    else:
        shape = ckpt.entry(f"{module}.shape")
        if shape is None or shape.shape != (2, 1) or shape.dtype != "I64":
            raise _fail(module, f"scheme {name} needs {module}.shape, I64 [2, 1]")
        out_f, in_f = (int(v) for v in ckpt.load(f"{module}.shape").reshape(-1).tolist())
    problem = shape_problem(scheme, out_f, in_f)
    if problem is not None:
        raise _fail(module, f"{problem} (format v1 keeps such modules in full precision)")
    return module_tensors(module, scheme, out_f, in_f)


def _check_values(ckpt: QFormatCheckpoint, specs: list[TensorSpec], qtype: str) -> None:
    """The value rules a loader applies too (one implementation each, in qformat.quantize): scales finite and
    positive, fp8 without NaN codes, 2:4 bitmasks keeping two of every four."""
    for spec in specs:
        if spec.name.rpartition(".")[2] in SCALE_SUFFIXES:
            if not bool(scales_valid(ckpt.load(spec.name), qtype)):
                raise _fail(spec.name, SCALE_PROBLEM)
        elif spec.dtype == VALUE_DTYPES["float"]:
            if bool(fp8_has_nan(ckpt.load(spec.name))):
                raise _fail(spec.name, "holds NaN (e4m3fn bit pattern 0x7F/0xFF)")
        elif spec.name.endswith(".bitmask"):
            in_f = 2 * next(s.shape[1] for s in specs if s.name.endswith(".compressed"))
            problem = bitmask_problem(ckpt.load(spec.name), in_f)
            if problem is not None:
                raise _fail(spec.name, problem)


def _hash_batches(ckpt: QFormatCheckpoint, names: list[str]) -> Iterator[list[str]]:
    """`names` in runs of about _HASH_CHUNK bytes (at most _HASH_BATCH tensors), so that a model of many small
    tensors does not pay a thread hand-off per tensor."""
    batch: list[str] = []
    size = 0
    for name in names:
        batch.append(name)
        size += ckpt.tensors[name][1].nbytes
        if size >= _HASH_CHUNK or len(batch) >= _HASH_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_hashes(ckpt: QFormatCheckpoint) -> int:
    """Every tensor hashes as provenance.tensor_hashes records; tensor bytes are read by offset in chunks (no memory
    map, so a file that shrinks meanwhile is a `FormatError`, not a SIGBUS)."""
    recorded = ckpt.qconfig.provenance.get("tensor_hashes")
    if not recorded:
        return 0
    missing = sorted(set(recorded) - set(ckpt.tensors))
    if missing:
        raise _fail(missing[0], "is recorded in provenance.tensor_hashes but missing from the weight files")
    extra = sorted(set(ckpt.tensors) - set(recorded))
    if extra:
        raise _fail(extra[0], "is in the weight files but not in provenance.tensor_hashes")
    names = sorted(recorded, key=lambda n: (ckpt.tensors[n][0], ckpt.tensors[n][1].start))
    with contextlib.ExitStack() as stack, format_errors():
        fds: dict[str, int] = {}
        for file in ckpt.files:
            fds[file] = open_tensor_data(ckpt.headers[file])
            stack.callback(os.close, fds[file])
        buffers = threading.local()

        def digests(batch: list[str]) -> list[str]:
            if not hasattr(buffers, "chunk"):
                buffers.chunk = memoryview(bytearray(_HASH_CHUNK))
            found = []
            for name in batch:
                file, entry = ckpt.tensors[name]
                sha = hashlib.sha256()
                for chunk in iter_tensor_chunks(fds[file], ckpt.headers[file].path, entry, buffers.chunk):
                    sha.update(chunk)
                found.append("sha256:" + sha.hexdigest())
            return found

        # Positional reads and sha256 both release the GIL: one thread per core reads and hashes tensors in parallel.
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            for batch, found in zip(_hash_batches(ckpt, names), pool.map(digests, _hash_batches(ckpt, names))):
                for name, digest in zip(batch, found):
                    if digest != recorded[name]:
                        raise _fail(name, "content hash differs from provenance.tensor_hashes (the file was modified)")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after the first problem, hash nothing more
    return len(recorded)


def _check_structure(ckpt: QFormatCheckpoint, quantized: list[str]) -> tuple[int | None, str]:
    """Build the model on meta: every Linear must be quantized or in the fallback list, and the list names Linears.

    A checkpoint the installed transformers cannot build (unknown model_type, a config it refuses, config sizes
    that disagree with the stored tensors) cannot be loaded, so it fails verification.
    """
    from qformat.errors import UnsupportedModelError

    try:
        structure = ckpt.structure()
    except UnsupportedModelError as exc:
        raise FormatError(f"transformers cannot load this checkpoint: {exc}") from None
    fallback = ckpt.qconfig.fallback_modules
    quantized_set = set(quantized)
    for name in structure.linears:
        if name not in quantized_set and name not in fallback:
            raise _fail(name, "is a Linear module that is neither quantized nor in the fallback list")
    for name in fallback:
        if name not in structure.linears:
            raise _fail(name, "is in the fallback list but is not a Linear module of the model")
    for name in quantized:
        if name not in structure.linears:
            raise _fail(name, "stores quantized tensors but is not a Linear module of the model")
    return len(structure.linears), ""


def verify(folder: str | Path, *, check_hashes: bool = True, check_structure: bool = True) -> VerifyReport:
    """Check the checkpoint in `folder` against the format spec; raise `FormatError` naming the first problem."""
    ckpt = open_checkpoint(folder)
    qconfig = ckpt.qconfig
    quantized = ckpt.quantized_modules
    entries = {name: entry for name, (_, entry) in ckpt.tensors.items()}
    for module in quantized:
        specs = _expected_tensors(ckpt, module)
        found = stored_tensors_problem(entries, module, specs)
        if found is not None:
            name, kind = found
            if kind == "missing":
                raise _fail(module, f"missing tensor {name}")
            if kind == "extra":
                raise _fail(name, "is not part of its module's scheme")
            entry, spec = entries[name], next(spec for spec in specs if spec.name == name)
            raise _fail(name, f"is {entry.dtype} {list(entry.shape)}, the spec needs {spec.dtype} {list(spec.shape)}")
        _check_values(ckpt, specs, qconfig.scheme_for(module)[1].weights.type)
    for entry in qconfig.fallback:
        weight = ckpt.entry(f"{entry.module}.weight")
        if weight is not None and weight.dtype not in FULL_PRECISION_DTYPES:
            raise _fail(entry.module, f"is kept in full precision ({entry.reason}) but stores a {weight.dtype} weight")
    stats = qconfig.statistics.get("modules")
    if isinstance(stats, dict) and set(stats) != set(quantized):
        odd = sorted(set(stats) ^ set(quantized))[0]
        raise _fail(odd, "statistics.modules and the stored quantized modules disagree")
    linears, note = _check_structure(ckpt, quantized) if check_structure else (None, "model structure not checked")
    hashes = _check_hashes(ckpt) if check_hashes else 0
    return VerifyReport(ckpt.folder, len(ckpt.tensors), len(quantized), len(qconfig.fallback), hashes, linears, note,
                        qconfig.format_version)
