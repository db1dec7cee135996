"""The card of a vLLM (compressed-tensors) export: what it is, how to serve it, what changed on the way."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from qformat.cards.facts import MARKER, ORIGINAL_END, ORIGINAL_START, card_facts
from qformat.cards.markdown import code, text
from qformat.cards.render import (DEFAULT_REPO_ID, base_model_link, card_metadata, card_tags, demote_headings,
                                  display_name, template_environment)

__all__ = ["render_export_card"]


def _args(args: dict[str, Any] | None) -> str:
    if args is None:
        return "unquantized"
    kind = "int8" if args["type"] == "int" else "fp8 (e4m3)"
    how = {"channel": "per output channel", "token": "dynamic per token", "tensor": "static per tensor"}
    return f"{kind}, {how.get(args['strategy'], args['strategy'])}"


def render_export_card(folder: str | Path, quant_config: dict[str, Any], densified: list[str], *,
                       repo_id: str | None = None) -> str:
    """README.md for the export of the qformat checkpoint in `folder` (config strings shown as `render_card` does)."""
    from qformat._version import __version__

    f = card_facts(folder)
    repo = repo_id or DEFAULT_REPO_ID
    meta = card_metadata(f, repo)
    meta.tags = [t for t in card_tags(f) if t not in ("qformat", "2:4", "sparsity")] + ["compressed-tensors", "vllm"]
    groups = [{"name": name, "format": g["format"], "weights": _args(g["weights"]),
               "activations": _args(g["input_activations"]), "count": len(g["targets"])}
              for name, g in quant_config["config_groups"].items()]
    template = resources.files("qformat.cards").joinpath("export_template.md.j2").read_text(encoding="utf-8")
    words = "/".join({"int": "INT8", "float": "FP8"}[t] for t in sorted(f.weight_types))
    return template_environment().from_string(template).render(
        card_data=meta.to_yaml(), marker=MARKER, version=__version__, f=f, repo_id=repo,
        title=f"{display_name(f)} — {words} for vLLM (compressed-tensors, exported by qformat)",
        groups=groups, densified=densified,
        ignored=", ".join(code(e.module) for e in f.fallback),
        base_model_link=base_model_link(f),
        environment="".join(f", {text(k)} {text(v)}" for k, v in f.environment.items()),
        original=demote_headings(f.source_card.body) if f.source_card.body else "",
        original_start=ORIGINAL_START, original_end=ORIGINAL_END,
    )
