"""`qformat.quantize_(model, config)`: quantize an already loaded transformers model in place, on its device.

The same plan as `qformat convert` (`qformat.models.structure_of` on the live model, whose checkpoint names are
what `save_pretrained` would write, then `qformat.plan.plan_conversion`) and the same weight math
(`quantize_weight`, on the weight's device: CPU or CUDA). Each planned `nn.Linear` is replaced by a `QuantLinear`
holding the quantized tensors, one at a time, so memory peaks at the model plus one module's outputs. The model then
carries the checkpoint config a conversion would have written and saves as a qformat checkpoint.

This is the path later work builds on (fallback search, outlier handling, quantization-aware training): it takes a
model, not a folder, and returns what it kept and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qformat.errors import OptionError
from qformat.loaders.config import QFormatConfig
from qformat.loaders.record import finished_config, source_record
from qformat.models.structure import structure_of
from qformat.nn.linear import QuantLinear
from qformat.nn.swap import replace_module
from qformat.plan.execute import quantize_module
from qformat.plan.record import WeightError
from qformat.plan.recipe import AUTO_DTYPE, QuantRecipe
from qformat.plan.rules import plan_conversion
from qformat.spec.config import QUANT_METHOD, FallbackEntry

__all__ = ["QuantizeResult", "apply_recipe", "quantize_"]


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize_` did: the quantized modules (checkpoint name -> scheme name), the modules kept in full
    precision with their reasons, and the model's new checkpoint config."""

    quantized: dict[str, str]
    fallback: tuple[FallbackEntry, ...]
    config: QFormatConfig


def _recipe(config: QFormatConfig | QuantRecipe | None, kwargs: dict[str, Any]) -> QuantRecipe:
    if isinstance(config, QuantRecipe):
        if kwargs:
            raise OptionError("pass either a config or keyword options to quantize_, not both")
        return config
    if config is None:
        config = QFormatConfig(**kwargs)
    elif kwargs:
        raise OptionError("pass either a config or keyword options to quantize_, not both")
    if not isinstance(config, QFormatConfig) or config.is_checkpoint or config.recipe is None:
        raise OptionError("quantize_ takes a QFormatConfig(scheme=...) request (or keyword options such as "
                          "scheme='w8a8-int8')")
    return config.recipe


def _refuse_quantized(model: nn.Module) -> None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None and not any(isinstance(m, QuantLinear) for m in model.modules()):
        return
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method) or QUANT_METHOD  # transformers' QuantizationMethod is a str enum
    raise OptionError(f"this model is already quantized (quant_method {str(method)!r}); quantize_ "
                      "takes a full-precision model: load the original weights")


def _attach(model: nn.Module, config: QFormatConfig) -> None:
    """Make transformers treat the model as a loaded qformat checkpoint (save_pretrained, push_to_hub)."""
    from transformers.quantizers.base import _assign_is_quantized

    from qformat.loaders.transformers import QFormatHfQuantizer

    model.hf_quantizer = QFormatHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    _assign_is_quantized(model)


def _tokenizer(model: nn.Module, tokenizer: Any, what: str) -> Any:
    """`tokenizer`, else the model's own, loaded from `model.name_or_path`; `what` names the option needing it."""
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    name = getattr(model, "name_or_path", "") or ""
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError):
        raise OptionError(f"{what} needs the model's tokenizer: pass quantize_(..., tokenizer=...)") from None


def _search(model: nn.Module, recipe: QuantRecipe, tokenizer: Any, progress: bool) -> Any:
    """Run the fallback search on the live model (left in full precision); the outcome's entries join the plan."""
    from qformat.search.api import search_model

    source = source_record(model)
    return search_model(model, tokenizer, recipe, source_label=source.get("repo_id") or "SOURCE",
                        progress=progress)


@torch.no_grad()
def quantize_(model: nn.Module, config: QFormatConfig | QuantRecipe | None = None, /, *, tokenizer: Any = None,
              progress: bool = False, **options: Any) -> QuantizeResult:
    """Quantize a loaded transformers `model` in place with qformat's rules; return what was quantized and kept.

    `config` is a `QFormatConfig(scheme=..., ignore=..., overrides=..., observer=..., sparsity=..., dtype=...)`, or
    give those as keywords: `qformat.quantize_(model, scheme="fp8-dynamic")`. Each quantized tensor equals what
    `qformat convert` writes when the model holds the checkpoint's values (loaded in its stored dtype, or in a wider
    one). `dtype` other than "auto" casts the tensors kept in full precision afterwards.

    With `smoothquant` (True, or a `qformat.smooth.SmoothQuant`), SmoothQuant's factors are folded into the model
    first, where the fold is exact (`qformat.smooth.smooth_model`; recorded in `provenance.smoothquant`). With
    `auto_fallback` (True, or a `qformat.search.FallbackBudget`), the accuracy-driven search runs next on the
    full-precision (smoothed) model; the modules it keeps get reason `sensitivity`, and its log and held-out
    evaluation go into the model's config. Both need `tokenizer` (the model's, loaded from `model.name_or_path`
    when not given). Smoothed tensors equal `qformat convert --smoothquant`'s when the model holds the source's
    values in float32 (as `from_pretrained` with `smoothquant` loads it); a bfloat16 model's weights are rounded
    to bfloat16 after folding.

    Raises:
        OptionError: a bad option, or a model that is already quantized.
        QFormatError: a model qformat cannot quantize (e.g. fused MoE experts), or NaN/Inf in a weight.
    """
    recipe = _recipe(config, options)
    _refuse_quantized(model)
    result = apply_recipe(model, recipe, tokenizer=tokenizer, progress=progress)
    _attach(model, result.config)
    return result


@torch.no_grad()
def apply_recipe(model: nn.Module, recipe: QuantRecipe, *, tokenizer: Any = None, progress: bool = False,
                 source: dict[str, Any] | None = None, **record: Any) -> QuantizeResult:
    """`quantize_` without its checks and without attaching the config to the model: smooth (if the recipe asks
    for SmoothQuant), plan (after the fallback search, if the recipe asks for one), quantize each planned module in
    place, build the checkpoint config. `from_pretrained` with a recipe that calibrates (`QuantRecipe.calibrates`)
    uses it after loading the full-precision model. `source` replaces the `provenance.source` read from the model;
    `record` goes to `finished_config` (`qformat distill` passes its `distillation` record, command and
    evaluation)."""
    structure = structure_of(model)
    if recipe.calibrates:
        tokenizer = _tokenizer(model, tokenizer, "smoothquant" if recipe.auto_fallback is None else "auto_fallback")
    smoothing = None
    if recipe.smoothquant is not None:
        from qformat.smooth.api import smooth_model

        smoothing = smooth_model(model, tokenizer, recipe.smoothquant, progress=progress)
    search = _search(model, recipe, tokenizer, progress) if recipe.auto_fallback is not None else None
    plan = plan_conversion(structure, recipe, search.fallback if search is not None else None)
    errors: dict[str, WeightError] = {}
    for decision in plan.quantized:
        module = decision.module
        assert decision.scheme is not None
        linear = model.get_submodule(module.module_path)
        stored, errors[module.name] = quantize_module(linear.weight.detach(), decision)
        quantized = QuantLinear.from_stored(stored, decision.scheme, bias=linear.bias,
                                            scheme_name=decision.scheme_name or "",
                                            outlier_threshold=recipe.outlier_threshold)
        replace_module(model, module.module_path, quantized.prepare())
        del stored, linear
    if recipe.dtype != AUTO_DTYPE:
        model.to(getattr(torch, recipe.dtype))
    result = finished_config(model, plan, recipe, source or source_record(model), errors, search, smoothing,
                             **record)
    return QuantizeResult({d.module.name: d.scheme_name or "" for d in plan.quantized}, plan.fallback, result)
