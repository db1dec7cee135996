"""Everything a model card says, taken from the checkpoint itself (config.json, headers, the source card).

Cards are generated from these facts only, so a card cannot claim a dtype, count or size the checkpoint does not
have, and the same checkpoint always gives the same card (no dates, no local paths).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qformat.cards.markdown import fenced, promote_headings
from qformat.cards.records import FallbackSearch, Measurement, parse_evaluation, parse_fallback_search
from qformat.checkpoint.inspect import inspect
from qformat.checkpoint.reader import open_checkpoint
from qformat.io.jsonfile import read_text
from qformat.spec.config import FallbackEntry
from qformat.spec.layout import FULL_PRECISION_DTYPES, QUANTIZED_MARKER
from qformat.spec.schemes import Scheme

__all__ = ["CardFacts", "DistillationFacts", "SizeBreakdown", "SmoothingFacts", "parse_distillation",
           "parse_smoothing", "SourceCard", "card_facts",
           "size_breakdown", "original_start", "split_source_card", "ORIGINAL_START", "ORIGINAL_END", "MARKER"]

#: First line of every generated card body; `qformat card` recognises its own cards by it.
MARKER = "<!-- qformat model card"
#: The lines around the original card a generated card carries: the first START line outside fenced code (config
#: strings in the card never make one) and the last END line (the card ends with it), so the original card may
#: itself contain either marker.
ORIGINAL_START = "<!-- qformat: original model card starts -->"
ORIGINAL_END = "<!-- qformat: original model card ends -->"

_AUTO_CLASSES = (("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
                 ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "text2text-generation"),
                 ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
                 ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
                 ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
                 ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"))  # fmt: skip


@dataclass(frozen=True)
class SourceCard:
    """The source model's card as carried in the checkpoint folder: its metadata and its body."""

    metadata: dict[str, Any] = field(default_factory=dict)
    body: str = ""


@dataclass(frozen=True)
class SizeBreakdown:
    """Where a checkpoint's bytes are: quantized modules, Linear modules kept in full precision, and every other
    tensor (embeddings, norms, biases of kept modules), with the float dtypes those other tensors are stored in, and
    the kept modules that have no tensors of their own (a tied lm_head: stored once, as the embedding)."""

    quantized: int
    kept_linear: int
    other: int
    other_dtypes: tuple[str, ...]
    kept_without_tensors: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.quantized + self.kept_linear + self.other


def size_breakdown(checkpoint: Any) -> SizeBreakdown:
    """`SizeBreakdown` of an opened checkpoint (`qformat.checkpoint.open_checkpoint`), from its headers alone."""
    qc = checkpoint.qconfig
    kept = set(qc.fallback_modules)
    quantized = kept_linear = other = 0
    dtypes: set[str] = set()
    with_tensors: set[str] = set()
    for name, (_, entry) in checkpoint.tensors.items():
        module = name.rpartition(".")[0]
        if module in kept:
            kept_linear += entry.nbytes
            with_tensors.add(module)
        elif f"{module}.{QUANTIZED_MARKER}" in checkpoint.tensors:
            quantized += entry.nbytes
        else:
            other += entry.nbytes
            if entry.dtype in FULL_PRECISION_DTYPES:
                dtypes.add(entry.dtype)
    without = tuple(e.module for e in qc.fallback if e.module not in with_tensors)
    return SizeBreakdown(quantized, kept_linear, other, tuple(sorted(dtypes)), without)


@dataclass(frozen=True)
class SmoothingFacts:
    """What a card says about SmoothQuant, from `provenance.smoothquant`: alpha, the calibration text (label,
    SHA-256, tokens) and how many Linear inputs were smoothed and left alone."""

    alpha: float
    text: str | None
    text_sha256: str | None
    tokens: int | None
    smoothed: int
    skipped: int


def _count(entries: Any) -> int:
    return sum(len(e["linears"]) for e in entries if isinstance(e, dict) and isinstance(e.get("linears"), list)) \
        if isinstance(entries, list) else 0


def parse_smoothing(record: Any) -> SmoothingFacts | None:
    """The card's SmoothQuant facts, or None where there is no readable record (a stranger's value is shown only
    where it has the expected type)."""
    if not isinstance(record, dict) or not isinstance(record.get("alpha"), (int, float)) \
            or isinstance(record.get("alpha"), bool):
        return None
    calibration = record.get("calibration") if isinstance(record.get("calibration"), dict) else {}

    def typed(key: str, kind: type) -> Any:
        value = calibration.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return SmoothingFacts(float(record["alpha"]), typed("dataset", str), typed("text_sha256", str),
                          typed("tokens", int), _count(record.get("smoothed")), _count(record.get("skipped")))


@dataclass(frozen=True)
class DistillationFacts:
    """What a card says about `qformat distill`, from `provenance.distillation`: the training run (steps, global
    batch, learning rate, noise rate, loss weights), the data's identity, the final losses and, where the run
    measured them, the metric before (plain quantization) and after training, with the source's value."""

    steps: int
    batch: int | None
    lr: float | None
    noise_rate: float | None
    loss_weights: dict[str, float]
    data: str | None
    data_sha256: str | None
    tokens: int | None
    final_losses: dict[str, float]
    metric: str | None = None
    source_value: float | None = None
    before: float | None = None
    after: float | None = None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _numbers(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in ((k, _number(v)) for k, v in value.items()) if v is not None and len(str(k)) < 40}


def parse_distillation(record: Any) -> DistillationFacts | None:
    """The card's distillation facts, or None where there is no readable record (a stranger's value is shown only
    where it has the expected type)."""
    if not isinstance(record, dict) or not isinstance(record.get("steps"), int) or isinstance(record["steps"], bool):
        return None
    options = record.get("options") if isinstance(record.get("options"), dict) else {}
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    tokens = data.get("tokens")
    facts = DistillationFacts(
        steps=record["steps"], batch=int(b) if (b := _number(record.get("global_batch"))) is not None else None,
        lr=_number(options.get("lr")), noise_rate=_number(options.get("noise_rate")),
        loss_weights=_numbers(options.get("loss_weights")),
        data=data.get("dataset") if isinstance(data.get("dataset"), str) else None,
        data_sha256=data.get("text_sha256") if isinstance(data.get("text_sha256"), str) else None,
        tokens=tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None,
        final_losses=_numbers(record.get("final_losses")))
    evaluation = record.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("metric"), str):
        metric = evaluation["metric"]

        def value(key: str) -> float | None:
            part = evaluation.get(key)
            return _number(part.get(metric)) if isinstance(part, dict) else None

        facts = dataclasses.replace(facts, metric=metric, source_value=value("source"), before=value("before"),
                                    after=value("after"))
    return facts


@dataclass(frozen=True)
class CardFacts:
    """The facts a card states, all derived from the checkpoint."""

    architecture: str
    model_type: str
    auto_class: str
    base_model: str | None
    license: str | None
    pipeline_tag: str | None
    format_version: int
    default_scheme: str
    schemes: dict[str, Scheme]
    scheme_descriptions: dict[str, str]
    overrides: list[str]
    observers: list[str]
    linear_modules: int
    quantized_modules: int
    modules_per_scheme: dict[str, int]
    fallback: tuple[FallbackEntry, ...]
    source_bytes: int | None
    checkpoint_bytes: int
    parameters: int | None
    mean_rel_error: float | None
    max_rel_error: float | None
    command: str
    qformat_version: str
    environment: dict[str, str]
    evaluation: tuple[Measurement, ...]  # the readable recorded results (qformat.cards.records)
    source_card: SourceCard
    sentence_transformers: bool
    imported_from: str | None = None  # the source format of a `qformat import`, e.g. "compressed-tensors"
    size: SizeBreakdown | None = None
    evaluation_hidden: int = 0  # recorded results not shown: unreadable, or past records.MAX_RESULTS
    fallback_search: FallbackSearch | None = None
    smoothquant: SmoothingFacts | None = None
    distillation: DistillationFacts | None = None
    outlier_threshold: float | None = None  # LLM.int8() decomposition of the int8 W8A8 modules (format version 2)

    @property
    def weight_types(self) -> set[str]:
        return {s.weights.type for s in self.schemes.values()}

    @property
    def sparse(self) -> bool:
        return any(s.sparsity for s in self.schemes.values())

    @property
    def base_model_id(self) -> str | None:
        """`base_model` if it is a valid Hub repo id (what the metadata and a link may carry), else None."""
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        if not self.base_model:
            return None
        try:
            validate_repo_id(self.base_model)
        except HFValidationError:
            return None
        return self.base_model

    @property
    def ratio(self) -> float | None:
        return self.source_bytes / self.checkpoint_bytes if self.source_bytes and self.checkpoint_bytes else None


def split_source_card(text: str) -> SourceCard:
    """Metadata and body of a README, and, for a card qformat generated, the original card it carries."""
    import yaml

    metadata: dict[str, Any] = {}
    body = text
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    if match:
        try:
            loaded = yaml.safe_load(match.group(1))
        except (yaml.YAMLError, RecursionError):  # a stranger's card: unreadable metadata is no metadata
            loaded = None
        metadata = loaded if isinstance(loaded, dict) else {}
        body = text[match.end() :]
    if body.lstrip().startswith(MARKER):  # one of ours: the original card is what it carries, if anything
        carried = _carried_original(body)
        body = body if carried is None else carried
    return SourceCard(metadata, body.strip("\n"))


def original_start(lines: list[str]) -> int | None:
    """Index of the ORIGINAL_START line in a generated card's body lines: the first one outside fenced code."""
    return next((i for i, (line, code) in enumerate(zip(lines, fenced(lines))) if not code and line == ORIGINAL_START),
                None)


def _carried_original(body: str) -> str | None:
    """The original card a generated card's body carries between ORIGINAL_START and ORIGINAL_END ("" if none), or
    None where the body only starts like a generated card (it has a START line but does not end with END): then the
    whole body is someone else's card, and nothing of it may be dropped."""
    lines = body.rstrip().split("\n")
    start = original_start(lines)
    if start is None:
        return ""
    if len(lines) - 1 <= start or lines[-1] != ORIGINAL_END:
        return None
    return promote_headings("\n".join(lines[start + 1 : -1]).strip("\n"))


def _auto_class(architecture: str) -> tuple[str, str | None]:
    for suffix, auto, pipeline in _AUTO_CLASSES:
        if architecture.endswith(suffix):
            return auto, pipeline
    return "AutoModel", "feature-extraction"


def card_facts(folder: str | Path) -> CardFacts:
    """Collect the card's facts from the checkpoint in `folder` (its README, if any, is the source card)."""
    folder = Path(folder)
    checkpoint = open_checkpoint(folder)
    qc = checkpoint.qconfig
    summary = inspect(folder)
    readme = folder / "README.md"
    source_card = split_source_card(read_text(readme)) if readme.is_file() or readme.is_symlink() else SourceCard()
    architecture = summary.architecture if isinstance(summary.architecture, str) and summary.architecture else "unknown"
    auto_class, pipeline = _auto_class(architecture)
    sentence_transformers = (folder / "modules.json").is_file()
    if sentence_transformers and auto_class == "AutoModel":
        pipeline = "sentence-similarity"
    meta = source_card.metadata
    source = qc.provenance.get("source") or {}
    environment = qc.provenance.get("environment")
    imported = qc.provenance.get("imported_from")
    evaluation, hidden = parse_evaluation(qc.evaluation)
    modules = qc.statistics.get("modules")
    observers = sorted({m["observer"] for m in (modules.values() if isinstance(modules, dict) else ())
                        if isinstance(m, dict) and isinstance(m.get("observer"), str) and m["observer"]})
    return CardFacts(
        architecture=architecture,
        model_type=summary.model_type if isinstance(summary.model_type, str) and summary.model_type else "unknown",
        auto_class=auto_class,
        base_model=summary.base_model if isinstance(summary.base_model, str) and summary.base_model else None,
        license=meta.get("license") if isinstance(meta.get("license"), str) else None,
        pipeline_tag=meta.get("pipeline_tag") if isinstance(meta.get("pipeline_tag"), str) else pipeline,
        format_version=qc.format_version,
        default_scheme=qc.default_scheme,
        schemes=dict(qc.schemes),
        scheme_descriptions=summary.schemes,
        overrides=summary.overrides,
        observers=observers,
        linear_modules=summary.linear_modules,
        quantized_modules=summary.quantized_modules,
        modules_per_scheme=summary.modules_per_scheme,
        fallback=qc.fallback,
        source_bytes=summary.source_bytes,
        checkpoint_bytes=summary.checkpoint_bytes,
        parameters=source.get("parameters") if isinstance(source.get("parameters"), int) else None,
        mean_rel_error=summary.mean_rel_error,
        max_rel_error=summary.max_rel_error,
        command=str(qc.provenance.get("command") or ""),
        qformat_version=str(qc.provenance.get("qformat_version") or ""),
        environment={str(k): str(v) for k, v in environment.items()} if isinstance(environment, dict) else {},
        evaluation=evaluation,
        source_card=source_card,
        sentence_transformers=sentence_transformers,
        imported_from=str(imported["format"]) if isinstance(imported, dict) and imported.get("format") else None,
        size=size_breakdown(checkpoint),
        evaluation_hidden=hidden,
        fallback_search=parse_fallback_search(qc.fallback_search),
        smoothquant=parse_smoothing(qc.provenance.get("smoothquant")),
        distillation=parse_distillation(qc.provenance.get("distillation")),
        outlier_threshold=qc.outlier_threshold,
    )
