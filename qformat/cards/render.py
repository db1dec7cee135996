"""Render a model card (README.md) for a qformat checkpoint from its facts, deterministically.

The YAML metadata is built with huggingface_hub's `ModelCardData` (so the Hub reads it: `base_model` as a repo id,
`base_model_relation: quantized`, `model-index` from recorded evaluations) and the body from the Jinja template
`template.md.j2`. Nothing in the card comes from anywhere but the checkpoint: the same checkpoint gives the same bytes.
Config strings are untrusted: the templates show each through a filter of `qformat.cards.markdown` (`md`, `code`,
`cell`, `comment`, `fence`), and the sentences built here and in `qformat.cards.accuracy` / `qformat.cards.size`
escape each string they quote with `text` or `code`, so none can change the card's structure.
"""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path
from typing import Any

from qformat._version import DISTRIBUTION
from qformat.cards import accuracy, markdown
from qformat.cards.facts import MARKER, ORIGINAL_END, ORIGINAL_START, CardFacts, DistillationFacts, card_facts
from qformat.cards.markdown import code, demote_headings, text
from qformat.cards.records import MAX_RESULTS
from qformat.cards.size import size_lines
from qformat.checkpoint.inspect import human_bytes

__all__ = ["DEFAULT_REPO_ID", "WEIGHT_WORDS", "base_model_link", "card_metadata", "card_tags", "demote_headings",
           "display_name", "export_commands", "free_text", "render_card", "summary", "template_environment",
           "weight_words", "write_card"]

#: What the usage snippet loads when no repo id is given (`qformat push` passes the real one).
DEFAULT_REPO_ID = "path/to/this/checkpoint"

#: The fallback search's result statuses a card words itself; any other is quoted as data.
_SEARCH_STATUSES = ("met", "unreachable", "max_evals", None)

#: How cards name each value type (`QuantArgs.type`).
WEIGHT_WORDS = {"int": "INT8", "float": "FP8"}


def template_environment() -> Any:  # -> jinja2.Environment
    """The Jinja environment of the card templates, with the filters that show untrusted strings safely."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters.update(md=markdown.text, code=markdown.code, cell=lambda value: markdown.code(value, table=True),
                       comment=markdown.comment, fence=markdown.fence)
    return env


def display_name(f: CardFacts) -> str:
    """The model's name in a title, as a code span: the base model's name, or the architecture."""
    return code(f.base_model.split("/")[-1] if f.base_model else f.architecture)


def base_model_link(f: CardFacts, *, table: bool = False) -> str:
    """The base model as a Hub link if it is a repo id; otherwise shown as recorded, and never linked."""
    if f.base_model_id:
        return f"[{code(f.base_model_id)}](https://huggingface.co/{f.base_model_id})"
    if f.base_model:
        return f"{code(f.base_model, table=table)} (not a Hub repo id)"
    return "not recorded"


def free_text(f: CardFacts) -> list[str]:
    """The config strings a card shows as inline text (not as code), as they appear in it: what `card --check`
    must read as data, not as claims of the card."""
    values = [e.detail for e in f.fallback] + [e.reason for e in f.fallback] + [f.qformat_version]
    values += [v for m in f.evaluation for v in (m.task or "", m.dataset, m.metric)]
    search = f.fallback_search
    if search is not None:
        values += [search.metric or "", search.status if search.status not in _SEARCH_STATUSES else ""]
        values += [t.dataset for t in (search.sensitivity_text, search.search_text, search.heldout_text) if t]
    values += [*f.environment.keys(), *f.environment.values(), *f.observers, f.imported_from or ""]
    return [text(v) for v in values if v]


def weight_words(f: CardFacts) -> str:
    """The checkpoint's value types as a card words them: "INT8", "FP8" or "FP8/INT8"."""
    return "/".join(WEIGHT_WORDS[t] for t in sorted(f.weight_types))


def card_tags(f: CardFacts) -> list[str]:
    """The card's Hub tags: qformat, quantized, the value types, the schemes and 2:4 where used."""
    tags = ["qformat", "quantized"]
    tags += [w.lower() for t, w in WEIGHT_WORDS.items() if t in f.weight_types]
    tags += sorted(name.replace("+2:4", "") for name in f.schemes)
    if f.sparse:
        tags += ["2:4", "sparsity"]
    return list(dict.fromkeys(tags))


def card_metadata(f: CardFacts, repo_id: str = DEFAULT_REPO_ID) -> Any:  # -> huggingface_hub.ModelCardData
    """The card's YAML metadata as a `ModelCardData`; `model-index` holds each recorded result with a task and a
    finite quantized value (task_type: its task, dataset: its text's label, metric_type: its metric)."""
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import EvalResult

    results = [EvalResult(task_type=m.task, dataset_type=m.dataset, dataset_name=m.dataset, metric_type=m.metric,
                          metric_value=m.quantized)
               for m in f.evaluation if m.task and m.dataset and m.quantized is not None]
    data: dict[str, Any] = {
        "library_name": "transformers",
        "tags": card_tags(f),
        "license": f.license,
        "pipeline_tag": f.pipeline_tag,
    }
    if f.base_model_id:  # the Hub refuses metadata whose base_model is not a repo id
        data["base_model"] = f.base_model_id
        data["base_model_relation"] = "quantized"
    if results:
        data["model_name"] = repo_id
        data["eval_results"] = results
    return ModelCardData(**{k: v for k, v in data.items() if v is not None})


def _title(f: CardFacts) -> str:
    return f"{display_name(f)} — {weight_words(f)}{' 2:4-sparse' if f.sparse else ''} (qformat)"


def _optimizations(f: CardFacts) -> list[str]:
    lines = []
    for name, description in f.scheme_descriptions.items():
        count = f.modules_per_scheme.get(name, 0)
        lines.append(f"{code(name)} on {count} module{'s' if count != 1 else ''}: {text(description)}")
    if f.overrides:
        lines.append("per-module overrides: " + ", ".join(code(o) for o in f.overrides))
    if f.observers:
        lines.append("scales: " + ", ".join(
            {"absmax": "absmax (max |w| / qmax per output channel)",
             "mse": "MSE-optimal shrink of absmax per output channel (the Neural Magic FP8 recipe's observer)"}.get(o)
            or text(o) for o in f.observers))
    lines.append("2:4 structured sparsity: two of every four weights kept, stored compressed with a bitmask"
                 if f.sparse else "no sparsity")
    if f.smoothquant is not None:
        lines.append(_smoothing_line(f))
    if f.distillation is not None:
        lines.append(_distillation_line(f))
    if f.outlier_threshold is not None:
        t = f"{f.outlier_threshold:g}"
        lines.append(f"LLM.int8() outlier decomposition at threshold {t}: input columns where a token reaches "
                     f"|x| >= {t} are multiplied in float32 (`quantization_config.outlier_threshold`)")
    return lines


def _smoothing_line(f: CardFacts) -> str:
    """SmoothQuant's line: alpha, the calibration text's identity, and the Linear inputs it smoothed and skipped."""
    sq = f.smoothquant
    assert sq is not None
    total = sq.smoothed + sq.skipped
    if sq.text is not None:
        sha = f", sha256 {code(sq.text_sha256[:12])}" if sq.text_sha256 else ""
        tokens = f", {sq.tokens} tokens" if sq.tokens is not None else ""
        calibrated = f"factors from calibration text {code(sq.text)}{sha}{tokens}"
    else:
        calibrated = "no calibration run (no input could be smoothed exactly)"
    return (f"SmoothQuant (alpha {sq.alpha:g}) folded into the norms and weights before quantizing: {sq.smoothed} of "
            f"{total} Linear inputs smoothed, {sq.skipped} left alone where the fold is not exact (reasons in "
            f"`provenance.smoothquant`); {calibrated}; the model's full-precision outputs are unchanged up to "
            "rounding (norm weights stored below float32 are rounded after folding)")


def _distillation_line(f: CardFacts) -> str:
    """The distillation line: the run, the data's identity, the final losses and the measured before/after."""
    d = f.distillation
    assert d is not None
    run = [f"{d.steps} steps"]
    if d.batch is not None:
        run.append(f"{d.batch} sequences per step")
    if d.lr is not None:
        run.append(f"lr {d.lr:g}")
    if d.noise_rate is not None:
        run.append(f"noise rate {d.noise_rate:g}")
    if d.loss_weights:
        run.append("loss weights " + ", ".join(f"{text(k)} {v:g}" for k, v in d.loss_weights.items()))
    data = ""
    if d.data is not None:
        sha = f", sha256 {code(d.data_sha256[:12])}" if d.data_sha256 else ""
        tokens = f", {d.tokens} tokens" if d.tokens is not None else ""
        data = f" on {code(d.data)}{sha}{tokens}"
    losses = ", ".join(f"{text(k)} {v:.4g}" for k, v in d.final_losses.items())
    line = (f"quantization-aware training by self-distillation (SDQ: {_distillation_terms(d)}){data}: "
            f"{', '.join(run)}; final losses {losses or 'not recorded'} (`provenance.distillation`)")
    if d.metric is not None and d.before is not None and d.after is not None:
        source = f"source {d.source_value:.5g}, " if d.source_value is not None else ""
        line += (f"; {text(d.metric)} measured at the end of the run: {source}quantized without training "
                 f"{d.before:.5g}, distilled {d.after:.5g}")
    return line


def _distillation_terms(d: DistillationFacts) -> str:
    """What the student learned from, named from the recorded loss weights (only the terms that were on)."""
    weights = d.loss_weights or {}
    taught = [what for key, what in (("output", "its outputs"), ("attention", "its self-attention outputs"))
              if weights.get(key, 1)]
    phrase = ("the full-precision model teaches its quantized copy through " + " and ".join(taught)) if taught else \
        "the quantized copy is trained on the task loss alone"
    if taught and weights.get("task"):
        phrase += ", plus the task loss"
    noise = "with quantization noise" if d.noise_rate is None or d.noise_rate < 1 else "every weight quantized each step"
    return f"{phrase}, {noise}"


def summary(f: CardFacts) -> list[str]:
    """The card's opening paragraphs: what the model is, then anything a reader must know before using it (a
    fallback search that missed its budget, a large measured loss)."""
    quantized = (f"{f.quantized_modules} of its {f.linear_modules} Linear modules quantized to {weight_words(f)} by "
                 "qformat")
    if f.base_model:
        first = f"This is {code(f.base_model)} with {quantized}, stored as a qformat v{f.format_version} checkpoint."
    else:
        first = f"This model has {quantized} and is stored as a qformat v{f.format_version} checkpoint."
    lines = [first]
    if f.fallback_search is not None and (missed := accuracy.search_summary(f.fallback_search)):
        lines.append(missed)
    large = [p for p in (accuracy.change_phrase(m) for m in accuracy.large_losses(f.evaluation)) if p]
    if large:
        lines.append(f"**Measured accuracy loss is large** ({accuracy.LARGE_WORDS}): {'; '.join(large[:3])}. "
                     "See Limitations.")
    return lines


def _sparse_pruned(f: CardFacts) -> bool:
    """2:4 sparsity that qformat applied by magnitude pruning (not carried over from an imported checkpoint)."""
    return f.sparse and not f.imported_from


def _limitations(f: CardFacts) -> list[str]:
    lines = [accuracy.accuracy_line(f.evaluation, weight_error=f.mean_rel_error is not None,
                                    sparse_pruned=_sparse_pruned(f))]
    if "float" in f.weight_types:
        lines.append("fp8 runs natively on CUDA GPUs with compute capability 8.9 or newer; elsewhere the weights stay "
                     "fp8 in memory and are upcast per call, which is slow")
    if f.sparse and f.imported_from:
        lines.append(f"the 2:4 sparsity comes from the imported {text(f.imported_from)} checkpoint, as it was stored "
                     "there. CPUs decode it to the dense quantized weight at load")
    elif f.sparse:
        lines.append(accuracy.sparsity_line(f.evaluation))
    lines.append("Needs qformat to load quantized; without it transformers does not know the quantization method")
    return lines


def _fallback_rows(f: CardFacts) -> list[dict[str, str]]:
    """The fallback table's rows; a `sensitivity` entry without a detail shows its measured rank and score."""
    rows = []
    for e in f.fallback:
        detail = e.detail
        measured = e.measured or {}
        if not detail and e.reason == "sensitivity" and all(
                isinstance(measured.get(k), (int, float)) and not isinstance(measured.get(k), bool)
                for k in ("rank", "units", "score")):
            detail = (f"sensitivity rank {measured['rank']:g} of {measured['units']:g} units "
                      f"(score {measured['score']:.2g})")
        rows.append({"module": e.module, "reason": e.reason, "detail": detail})
    return rows


def export_commands(repo_id: str, *, drop_outlier_threshold: bool = False) -> str:
    """The commands that turn this checkpoint into a vLLM one: `qformat export` takes a local folder, so a Hub repo
    is downloaded first (with huggingface_hub's `hf` command). A checkpoint with an outlier threshold exports only
    with `--drop-outlier-threshold` (vLLM then runs plain W8A8)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    flags = " --to vllm" + (" --drop-outlier-threshold" if drop_outlier_threshold else "")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:  # a local path (the placeholder is one)
        local = shlex.quote(repo_id)
        return f"qformat export {local} OUTPUT{flags}\nvllm serve OUTPUT"
    name = repo_id.split("/")[-1]
    return (f"hf download {repo_id} --local-dir {name}\nqformat export {name} {name}-vllm{flags}\n"
            f"vllm serve {name}-vllm")


def _evaluation_commands(f: CardFacts) -> str:
    return "\n".join(dict.fromkeys(m.command for m in f.evaluation if m.command))


def render_card(folder: str | Path, *, repo_id: str | None = None) -> str:
    """The README.md text for the checkpoint in `folder` (`repo_id` goes into the usage snippet and model-index)."""
    f = card_facts(folder)
    repo = repo_id or DEFAULT_REPO_ID
    template = resources.files("qformat.cards").joinpath("template.md.j2").read_text(encoding="utf-8")
    ratio = f"{f.ratio:.2f}x smaller" if f.ratio else "-"
    if f.mean_rel_error is not None:
        error = f"mean {f.mean_rel_error:.4g}, max {f.max_rel_error:.4g}"
    elif f.imported_from:
        error = (f"not measured: this checkpoint was imported from a {text(f.imported_from)} checkpoint, without the "
                 "full-precision weights to compare against")
    else:
        error = "not recorded"
    hidden = f.evaluation_hidden
    return template_environment().from_string(template).render(
        card_data=card_metadata(f, repo).to_yaml(),
        marker=MARKER,
        title=_title(f),
        summary="\n\n".join(summary(f)),
        f=f,
        base_model_cell=base_model_link(f, table=True),
        base_model_link=base_model_link(f),
        distribution=DISTRIBUTION,
        optimizations=_optimizations(f),
        fallback_rows=_fallback_rows(f),
        search=accuracy.search_report(f.fallback_search) if f.fallback_search is not None else None,
        source_size=human_bytes(f.source_bytes),
        quantized_size=human_bytes(f.checkpoint_bytes),
        ratio=ratio,
        size_lines=size_lines(f),
        error_line=error,
        error_measured=f.mean_rel_error is not None,
        evaluation_rows=accuracy.evaluation_rows(f.evaluation),
        evaluation_hidden=(f"{hidden} more recorded result{'s are' if hidden != 1 else ' is'} not shown (unreadable, "
                           f"or past the first {MAX_RESULTS})." if hidden else ""),
        evaluation_commands=_evaluation_commands(f),
        repo_id=repo,
        export_commands=export_commands(repo, drop_outlier_threshold=f.outlier_threshold is not None),
        kernel_words=weight_words(f),
        environment="".join(f", {text(name)} {text(version)}" for name, version in f.environment.items()),
        limitations=_limitations(f),
        original=demote_headings(f.source_card.body) if f.source_card.body else "",
        original_start=ORIGINAL_START,
        original_end=ORIGINAL_END,
    )


def write_card(folder: str | Path, *, repo_id: str | None = None) -> Path:
    """Write the rendered card to `folder`/README.md (replacing the source card, which it carries over)."""
    from qformat.io.atomic import write_file_atomic  # never writes through a link planted in the folder

    text = render_card(folder, repo_id=repo_id)
    return write_file_atomic(folder, "README.md", text.encode("utf-8"))
