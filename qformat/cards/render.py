"""Render a model card (README.md) for a qformat checkpoint from its facts, deterministically.

The YAML metadata is built with huggingface_hub's `ModelCardData` (so the Hub reads it: `base_model` as a repo id,
`base_model_relation: quantized`, `model-index` from recorded evaluations) and the body from the Jinja template
`template.md.j2`. Nothing in the card comes from anywhere but the checkpoint: the same checkpoint gives the same bytes.
Config strings are untrusted: the templates show each through a filter of `qformat.cards.markdown` (`md`, `code`,
`cell`, `comment`, `fence`), so none can change the card's structure.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from qformat._version import DISTRIBUTION
from qformat.cards import markdown
from qformat.cards.facts import MARKER, ORIGINAL_END, ORIGINAL_START, CardFacts, card_facts
from qformat.cards.markdown import code, demote_headings, text
from qformat.checkpoint.inspect import human_bytes

__all__ = ["DEFAULT_REPO_ID", "WEIGHT_WORDS", "base_model_link", "card_metadata", "card_tags", "demote_headings",
           "display_name", "free_text", "render_card", "template_environment", "weight_words", "write_card"]

#: What the usage snippet loads when no repo id is given (`qformat push` passes the real one).
DEFAULT_REPO_ID = "path/to/this/checkpoint"

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
    values += [str(r.get(key, "")) for r in f.evaluation for key in ("task", "dataset", "metric")]
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
    """The card's YAML metadata as a `ModelCardData`."""
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import EvalResult

    results = []
    for r in f.evaluation:
        try:
            results.append(EvalResult(task_type=str(r["task"]), dataset_type=str(r["dataset"]),
                                      dataset_name=str(r.get("dataset_name", r["dataset"])),
                                      metric_type=str(r["metric"]), metric_value=float(r["quantized"])))
        except (KeyError, TypeError, ValueError):
            continue  # an entry without the fields model-index needs stays in the body table only
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
    return lines


#: Full-precision dtypes that `qformat convert --dtype bfloat16` would halve.
_WIDE_DTYPES = {"F32": "float32", "F64": "float64"}


def _size_sentence(f: CardFacts) -> str:
    """Where the checkpoint's bytes are, so the size gain is explained by what actually holds it: quantized modules,
    kept Linear modules, and the other tensors (an fp32 tied embedding, not the one kept lm_head, is what keeps an
    fp32 Gemma 3 270M large)."""
    size = f.size
    if size is None or not size.total:
        return ""
    def part(n: int) -> str:
        return f"{human_bytes(n)} ({100 * n / size.total:.0f} %)"

    pieces = [f"quantized Linear modules {part(size.quantized)}"]
    if f.fallback and size.kept_linear:
        pieces.append(f"{len(f.fallback)} Linear module(s) kept in full precision {part(size.kept_linear)}")
    elif f.fallback:  # e.g. a tied lm_head: stored once, as the embedding
        pieces.append(f"{len(f.fallback)} Linear module(s) kept in full precision with no tensors of their own")
    stored = ", ".join(size.other_dtypes)
    pieces.append(f"other tensors (embeddings, norms, biases) {part(size.other)}" + (f", stored as {stored}"
                                                                                      if stored else ""))
    sentence = "Of the checkpoint's " + human_bytes(size.total) + ": " + "; ".join(pieces)
    wide = [_WIDE_DTYPES[d] for d in size.other_dtypes if d in _WIDE_DTYPES]
    if wide and size.other >= size.total / 5:
        sentence += (f". Those {' and '.join(wide)} tensors would take half the space with "
                     "`qformat convert --dtype bfloat16`")
    return sentence


def _limitations(f: CardFacts) -> list[str]:
    measured = "the weight error above is measured, " if f.mean_rel_error is not None else ""
    lines = [f"Quantization changes the model's outputs slightly; {measured}the effect on accuracy is "
             + ("in the evaluation table" if f.evaluation else "not measured for this checkpoint")]
    if "float" in f.weight_types:
        lines.append("fp8 runs natively on CUDA GPUs with compute capability 8.9 or newer; elsewhere the weights stay "
                     "fp8 in memory and are upcast per call, which is slow")
    if f.sparse and f.imported_from:
        lines.append(f"the 2:4 sparsity comes from the imported {text(f.imported_from)} checkpoint, as it was stored "
                     "there. CPUs decode it to the dense quantized weight at load")
    elif f.sparse:
        lines.append("2:4 sparsity was applied by magnitude pruning without retraining; it costs accuracy unless the "
                     "source model was trained for it. CPUs decode it to the dense quantized weight at load")
    size = _size_sentence(f)
    if size:
        lines.append(size)
    lines.append("Needs qformat to load quantized; without it transformers does not know the quantization method")
    return lines


def _evaluation_rows(f: CardFacts) -> list[dict[str, str]]:
    rows = []
    for r in f.evaluation:
        try:
            baseline, quantized = float(r["baseline"]), float(r["quantized"])
        except (KeyError, TypeError, ValueError):
            continue
        recovery = f"{100 * quantized / baseline:.1f} %" if baseline else "-"
        rows.append({"task": str(r.get("task", "")), "dataset": str(r.get("dataset", "")),
                     "metric": str(r.get("metric", "")), "baseline": f"{baseline:g}", "quantized": f"{quantized:g}",
                     "recovery": recovery})
    return rows


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
    summary = (f"{code(f.base_model) if f.base_model else 'This model'} with {f.quantized_modules} of its "
               f"{f.linear_modules} Linear modules quantized to {weight_words(f)} "
               f"by qformat, stored as a qformat v{f.format_version} checkpoint.")
    return template_environment().from_string(template).render(
        card_data=card_metadata(f, repo).to_yaml(),
        marker=MARKER,
        title=_title(f),
        summary=summary,
        f=f,
        base_model_cell=base_model_link(f, table=True),
        base_model_link=base_model_link(f),
        distribution=DISTRIBUTION,
        optimizations=_optimizations(f),
        source_size=human_bytes(f.source_bytes),
        quantized_size=human_bytes(f.checkpoint_bytes),
        ratio=ratio,
        error_line=error,
        error_measured=f.mean_rel_error is not None,
        evaluation_rows=_evaluation_rows(f),
        repo_id=repo,
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
