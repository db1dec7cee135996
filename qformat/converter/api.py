"""`qformat.convert()`: any Hugging Face model (folder or Hub repo) to a qformat checkpoint, streaming."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformat.io.support_files import copy_support_files
from qformat.converter.layout import OutputLayout, declare_dtype, plan_output, resolve_dtype
from qformat.converter.options import ConvertOptions
from qformat.converter.pipeline import run_pipeline
from qformat.plan.record import checkpoint_block
from qformat.plan.rules import ConversionPlan, plan_conversion
from qformat.search.criterion import FallbackBudget
from qformat.search.fallback import SearchOutcome
from qformat.smooth.api import SmoothingRecord
from qformat.smooth.fold import TensorEdit
from qformat.smooth.options import SmoothQuant
from qformat.io.resolve import ResolvedSource, resolve_source_for
from qformat.models.structure import analyze_structure
from qformat.errors import CorruptCheckpointError, SourceError, UnsupportedModelError
from qformat.io.atomic import atomic_output_dir
from qformat.io.index import write_weight_index
from qformat.io.jsonfile import load_json
from qformat.io.safetensors_format import read_header
from qformat.io.source import SourceCheckpoint
from qformat.io.writer import write_json
from qformat.spec.layout import QUANTIZABLE_DTYPES

__all__ = ["ConvertResult", "convert"]

logger = logging.getLogger(__name__)


#: Bytes of source read ahead in the background while the model structure is analyzed (imports take seconds).
READAHEAD_START = 512 * 2**20


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion produced."""

    output: Path
    linear_modules: int
    quantized_modules: int
    source_bytes: int
    checkpoint_bytes: int
    search: SearchOutcome | None = None
    smoothing: SmoothingRecord | None = None


def _quantization_config(plan: ConversionPlan, options: ConvertOptions, src: ResolvedSource,
                         checkpoint: SourceCheckpoint, layout: OutputLayout, hashes: dict[str, str],
                         stats: dict[str, Any], skipped: list[str],
                         search: SearchOutcome | None, smoothing: SmoothingRecord | None) -> dict[str, Any]:
    source = {
        "repo_id": src.repo_id,
        "revision": src.revision,
        "base_model": options.base_model or src.repo_id,
        "format": checkpoint.format,
        "parameters": checkpoint.numel,
        "bytes": checkpoint.nbytes,
        "skipped_weight_files": skipped,
    }
    return checkpoint_block(plan, options, source=source,
                            command=options.command(src.repo_id or options.base_model or "SOURCE"), errors=stats,
                            checkpoint_bytes=layout.total_bytes, tensor_hashes=hashes,
                            evaluation=search.evaluation if search is not None else None,
                            fallback_search=search.record if search is not None else None,
                            smoothing=smoothing.to_dict() if smoothing is not None else None)


def _calibrate(folder: Path, checkpoint: SourceCheckpoint, options: ConvertOptions, *, source_label: str,
               progress: bool) -> tuple[SmoothingRecord | None, dict[str, TensorEdit], SearchOutcome | None]:
    """Load the full-precision model once (float32) with its tokenizer; fold SmoothQuant's factors into it when
    asked, then run the fallback search on that (smoothed) model when asked. Returns the smoothing record, its edits
    by source tensor name (the pipeline applies the same edits to the stored tensors) and the search's outcome."""
    import gc

    from qformat.eval.api import load_model, load_tokenizer
    from qformat.search.api import search_model
    from qformat.smooth.api import checkpoint_edits, smooth_model

    from qformat.eval.data import load_text

    if options.smoothquant is not None:
        load_text(options.smoothquant.calib)  # a missing calibration file fails before the model loads
    tokenizer = load_tokenizer(folder)  # before the model: a folder without one fails at once
    model = load_model(folder)
    try:
        smoothing, edits = None, {}
        if options.smoothquant is not None:
            smoothing = smooth_model(model, tokenizer, options.smoothquant, progress=progress)
            edits = checkpoint_edits(smoothing, model, checkpoint.tensors)
        search = None
        if options.auto_fallback is not None:
            search = search_model(model, tokenizer, options, folder=folder, source_label=source_label,
                                  progress=progress)
        return smoothing, edits, search
    finally:
        del model
        gc.collect()


def _refuse_non_float_weights(layout: OutputLayout) -> None:
    for job in layout.jobs:
        if job.decision is not None and job.source.dtype not in QUANTIZABLE_DTYPES:
            raise UnsupportedModelError(
                f"{job.source.name} is stored as {job.source.dtype}, not a float type; qformat quantizes float "
                "weights only (convert from the full-precision model)"
            )


def _reread(folder: Path, layout: OutputLayout) -> None:
    """Re-read every written shard: our header parser and safetensors itself must both accept it as planned."""
    from safetensors import safe_open

    for name, planned in zip(layout.shard_names, layout.shard_layouts):
        header = read_header(folder / name)
        if header.tensors != planned.entries:
            raise CorruptCheckpointError(f"{name} does not read back as written; the disk may be failing")
        with safe_open(folder / name, framework="pt") as fh:
            if set(fh.keys()) != set(planned.entries):
                raise CorruptCheckpointError(f"safetensors reads {name} differently than written; report this bug")


def convert(source: str | os.PathLike[str], output: str | os.PathLike[str], *, scheme: str = "w8a8-int8",
            ignore: tuple[str, ...] | list[str] = (), overrides: tuple[tuple[str, str], ...] | list[Any] = (),
            observer: str | None = None, sparsity: str | None = None, dtype: str = "auto",
            base_model: str | None = None, revision: str | None = None, max_shard_size: int | str = "5GB",
            auto_fallback: FallbackBudget | dict[str, Any] | bool | None = None,
            outlier_threshold: float | None = None, smoothquant: SmoothQuant | dict[str, Any] | bool | None = None,
            overwrite: bool = False, progress: bool = False) -> ConvertResult:
    """Convert a Hugging Face model into a qformat checkpoint at `output`.

    Args:
        source: a local model folder or a Hub repo id (downloaded with huggingface_hub, `revision` pinnable).
        output: the folder to create. It must not exist unless `overwrite`; it is written atomically.
        scheme: default scheme: "w8a16-int8", "w8a8-int8", "fp8-dynamic", "fp8-weight-only" (each also "+2:4").
        ignore: module names or "re:" patterns to keep in full precision.
        overrides: (pattern, scheme) pairs or "PATTERN=SCHEME" strings; scheme "none" keeps modules in full precision.
        observer: "absmax" or "mse"; default "mse" for fp8 schemes and "absmax" for int8.
        sparsity: "2:4" to prune every quantized module to 2:4 structured sparsity.
        dtype: dtype of the float tensors kept in full precision (embeddings, norms, biases, fallback weights):
            "bfloat16", "float16", "float32", or "auto": config.json's `dtype`/`torch_dtype` if it names one of
            those, else each tensor's stored dtype. The output's config.json names the dtype chosen.
        base_model: Hub repo id to record as the base model of a local source.
        max_shard_size: largest output shard, e.g. "5GB".
        auto_fallback: run an accuracy-driven fallback search first (`qformat.search`): True for the default
            budget (1 %), or a `FallbackBudget` (or a dict of its fields: max_loss, metric, calib, eval_text,
            heldout_text, max_evals, max_fallback, max_tokens). The modules it keeps get reason `sensitivity`; its
            log and the held-out evaluation are recorded in config.json. Needs the source's tokenizer.
        outlier_threshold: LLM.int8() decomposition threshold for the int8 W8A8 modules (e.g. 6.0), recorded in
            the checkpoint (format version 2; docs/FORMAT.md section 8.4).
        smoothquant: fold SmoothQuant factors into the model before quantizing: True (alpha 0.5, built-in
            calibration text) or a `qformat.smooth.SmoothQuant` (or a dict of its fields: alpha, calib,
            max_tokens). Norm weights and Linear weights change where the fold is exact for the architecture (the
            rest is recorded as skipped, with reasons); the checkpoint is an ordinary one. Needs the source's
            tokenizer. With `auto_fallback` too, the search runs on the smoothed model.
        progress: show a progress bar of bytes converted.

    Returns:
        A `ConvertResult` summarizing the checkpoint.

    Raises:
        QFormatError: a subclass naming what is wrong with the source, the options or the output location.
    """
    from qformat.converter.options import parse_override, parse_size

    pairs = tuple(parse_override(o) if isinstance(o, str) else (o[0], o[1]) for o in overrides)
    options = ConvertOptions(scheme=scheme, ignore=tuple(ignore), overrides=pairs, observer=observer,
                             sparsity=sparsity, dtype=dtype, base_model=base_model, revision=revision,
                             max_shard_size=parse_size(max_shard_size), auto_fallback=auto_fallback,
                             outlier_threshold=outlier_threshold, smoothquant=smoothquant)
    out = Path(output)
    src = resolve_source_for(source, out, revision=revision, overwrite=overwrite)
    checkpoint = SourceCheckpoint(src.path)
    checkpoint.readahead(READAHEAD_START)
    structure = analyze_structure(src.path, {name: t.shape for name, t in checkpoint.tensors.items()})
    source_label = src.repo_id or options.base_model or "SOURCE"
    search, smoothing, edits = None, None, {}
    if options.calibrates:
        plan_conversion(structure, options)  # a bad option fails before minutes of calibration and search
        smoothing, edits, search = _calibrate(src.path, checkpoint, options, source_label=source_label,
                                              progress=progress)
    plan = plan_conversion(structure, options, search.fallback if search is not None else None)
    config = load_json(src.path / "config.json", error=SourceError)
    target_dtype = resolve_dtype(options.dtype, config)
    layout = plan_output(checkpoint, plan, options.max_shard_size, dtype=target_dtype, edits=edits)
    _refuse_non_float_weights(layout)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        _copied, skipped = copy_support_files(src.path, tmp)
        read = set(checkpoint.files) | ({checkpoint.index_file} if checkpoint.index_file else set())
        skipped = sorted(f for f in skipped if f not in read)
        with checkpoint.reader() as reader:
            result = run_pipeline(layout, reader, tmp, progress=progress)
        _reread(tmp, layout)
        if len(layout.shard_names) > 1:
            weight_map = {spec.name: layout.shard_names[job.shard] for job in layout.jobs for spec in job.outputs}
            write_weight_index(tmp, weight_map, layout.total_bytes)
        config = declare_dtype(config, target_dtype)
        config["quantization_config"] = _quantization_config(plan, options, src, checkpoint, layout, result.hashes,
                                                             result.stats, skipped, search, smoothing)
        write_json(tmp / "config.json", config)
    logger.info("wrote %s", out)
    return ConvertResult(out, len(plan.decisions), len(plan.quantized), checkpoint.nbytes, layout.total_bytes,
                         search, smoothing)
