"""`qformat.evaluate(...)` / `qformat eval`: measure a model, against its source when given, on fixed texts.

Both models are loaded in float32 with transformers (the quantized one through qformat's loader, so its Linear
modules run on the int8/fp8 kernels exactly as a user's would) and evaluated in lockstep, window by window, so no
logits are kept. Results are record-shaped (`qformat.eval.metrics.result_record`) and can be written into the
checkpoint (`record=True`).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qformat.errors import OptionError, QFormatError, SourceError
from qformat.eval.data import EvalText, builtin_text, load_text
from qformat.eval.metrics import result_record
from qformat.eval.record import record_evaluation
from qformat.eval.tasks import make_task, model_kind

__all__ = ["DEFAULT_MAX_TOKENS", "EvaluationReport", "evaluate", "load_model", "load_tokenizer"]

#: Tokens evaluated per text by default: enough for a stable perplexity on a small LM, a minute on 2 cores.
DEFAULT_MAX_TOKENS = 2048


@dataclass(frozen=True)
class EvaluationReport:
    """The results of one evaluation, each shaped as a `quantization_config.evaluation` entry."""

    results: tuple[dict[str, Any], ...]
    recorded: Path | None = None

    def to_text(self) -> str:
        lines = ["| text | tokens | metric | source | model | change |", "|---|---|---|---|---|---|"]
        for r in self.results:
            base = "-" if r["baseline"] is None else f"{r['baseline']:.6g}"
            value = "-" if r["quantized"] is None else f"{r['quantized']:.6g}"
            change = "-" if r["relative_change"] is None else f"{100 * r['relative_change']:+.2f} %"
            if r.get("tokens") is None and r.get("samples") is not None:  # an lm-evaluation-harness task
                where, size = f"{r['task']}: {r['dataset']}", f"{r['samples']} samples"
            else:
                where, size = r["dataset"], r["tokens"]
            lines.append(f"| {where} | {size} | {r['metric']} | {base} | {value} | {change} |")
        if self.recorded is not None:
            lines.append(f"recorded in {self.recorded}")
        return "\n".join(lines)


def _model_class(kind: str, config: Any) -> Any:
    """The class to load: the Auto class of the kind; for an encoder, the checkpoint's own architecture where
    transformers has it (so a classifier keeps its names and head), else AutoModel."""
    import transformers

    if kind == "encoder":
        architectures = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, architectures[0], None) if architectures else None
        return cls if isinstance(cls, type) else transformers.AutoModel
    return {"causal-lm": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]


def load_model(folder: str | Path, kind: str | None = None) -> Any:
    """Load the model in `folder` for evaluation (float32, eval mode); a qformat checkpoint loads quantized."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        kind = kind or model_kind(config)
        model = _model_class(kind, config).from_pretrained(folder, dtype=torch.float32)
    except QFormatError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"{folder} cannot be loaded by transformers ({first}); give a model folder") from None
    return model.eval()


def load_tokenizer(*folders: Path) -> Any:
    """The tokenizer of the first of `folders` that has one that loads; `SourceError` naming the first folder
    otherwise."""
    from transformers import AutoTokenizer

    for folder in folders:
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise SourceError(f"no tokenizer in {folders[0]}; copy the source's tokenizer files into it")


def _source_label(folder: Path) -> str:
    """What the recorded command names the source as: its Hub repo id if the checkpoint recorded one."""
    from qformat.io.jsonfile import load_json

    try:
        block = load_json(folder / "config.json").get("quantization_config") or {}
        source = block.get("provenance", {}).get("source", {})
        label = source.get("base_model") or source.get("repo_id")
    except (QFormatError, AttributeError):
        label = None
    return label if isinstance(label, str) and label else "SOURCE"


def _command(folder: Path, against: str | None, texts: list[EvalText], max_tokens: int) -> str:
    args = ["qformat", "eval", "OUTPUT"]
    if against is not None:
        args += ["--against", _source_label(folder)]
    for text in texts:
        args += ["--text", text.label]
    args += ["--max-tokens", str(max_tokens)]
    return shlex.join(args)


def evaluate(model: str | os.PathLike[str], *, against: str | os.PathLike[str] | None = None,
             texts: list[str | os.PathLike[str]] | tuple[()] = (), max_tokens: int = DEFAULT_MAX_TOKENS,
             tasks: list[str] | tuple[()] = (), include_path: str | os.PathLike[str] | None = None,
             limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 1,
             record: bool = False, progress: bool = False) -> EvaluationReport:
    """Evaluate the model folder `model`, against the full-precision `against` (a folder or Hub repo id) if given.

    With `tasks`, runs those lm-evaluation-harness tasks instead (and only them; `qformat.eval.harness`, needs the
    `harness` extra), with `include_path`, `limit`, `num_fewshot` and `batch_size` passed to it.

    Args:
        model: a model folder (a qformat checkpoint, or any transformers model).
        against: the source to compare with; without it only the model's own metrics (perplexity, loss) are
            measured, and an encoder has nothing to measure.
        texts: UTF-8 files, or built-in texts ("heldout", "search", "calibration": disjoint parts of CPython's
            pydoc topics); default: the built-in held-out text.
        max_tokens: tokens evaluated per text.
        record: write the results into `model`'s config.json (`quantization_config.evaluation`), changing nothing
            else.
        progress: show progress bars.

    Raises:
        QFormatError: a folder that does not load, a bad text file, nothing to measure; with `tasks`, lm-eval not
            installed or an unknown task.
    """
    if tasks:
        if texts:
            raise OptionError("--tasks runs only lm-evaluation-harness tasks; measure --text files in a separate "
                              "qformat eval run")
        from qformat.eval.harness import run_harness

        results = run_harness(model, list(tasks), include_path=include_path, limit=limit, against=against,
                              batch_size=batch_size, num_fewshot=num_fewshot)
        recorded = record_evaluation(model, results) if record else None
        return EvaluationReport(tuple(results), recorded)
    if include_path is not None or limit is not None or num_fewshot is not None:
        raise OptionError("--include-path, --limit and --num-fewshot apply to lm-evaluation-harness tasks; "
                          "give --tasks too")
    if max_tokens < 16:
        raise OptionError(f"--max-tokens must be at least 16, got {max_tokens}")
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is not a model folder (no config.json)")
    eval_texts = [load_text(t) for t in texts] or [builtin_text("heldout")]
    quantized = load_model(folder)
    kind = model_kind(quantized.config)
    source = None
    if against is not None:
        from qformat.io.resolve import resolve_source

        source_path = resolve_source(against).path
        source = load_model(source_path, kind)
    tokenizer = load_tokenizer(folder, *([source_path] if against is not None else []))
    command = _command(folder, None if against is None else str(against), eval_texts, max_tokens)
    results: list[dict[str, Any]] = []
    torch.manual_seed(0)
    for text in eval_texts:
        task = make_task(quantized, tokenizer, text, max_tokens=max_tokens, progress=progress, folder=folder)
        reference = task.reference(source, cache=False) if source is not None else None
        values = task.measure(quantized, reference)
        if not values:
            raise OptionError(f"a {kind} model has no metric of its own; give --against SOURCE to compare with")
        for name, value in values.items():
            baseline = reference.values.get(name) if reference is not None else None
            results.append(result_record(name, task=task.hub_task, text=task.identity(), baseline=baseline,
                                         quantized=value, command=command))
    recorded = record_evaluation(folder, results) if record else None
    return EvaluationReport(tuple(results), recorded)


