"""Quantizing a full-precision model while transformers loads it (`QFormatConfig(scheme=...)` on a plain model).

Before the weights load, the model's structure and the checkpoint's tensors are planned with the converter's rules;
each planned `nn.Linear` becomes a `QuantLinear` on the meta device. transformers then hands each planned weight,
as read from the checkpoint, to `OnLoadQuantization.quantize`, which quantizes it on the device it was loaded to
and returns the tensors the `QuantLinear` stores. Nothing else of the model changes.

Stored values, whatever the load dtype: transformers casts a weight to the model's dtype before a quantizer sees it;
the planned weights are added to the model's `_keep_in_fp32_modules_strict` for the duration of the load, which
makes transformers read them in float32 instead (exact for every float source dtype, so the tensors equal what
`qformat convert` computes from the file). This costs a float32 copy of one weight at a time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qformat.errors import OptionError, SourceError, UnsupportedModelError
from qformat.io.source import SourceCheckpoint
from qformat.loaders.config import QFormatConfig
from qformat.loaders.record import finished_config, source_record
from qformat.models.structure import structure_of
from qformat.nn.linear import QuantLinear
from qformat.nn.swap import replace_module
from qformat.plan.record import WeightError
from qformat.plan.execute import quantize_module
from qformat.plan.recipe import QuantRecipe
from qformat.plan.rules import ConversionPlan, ModuleDecision, plan_conversion
from qformat.spec.layout import QUANTIZABLE_DTYPES

__all__ = ["OnLoadQuantization"]

logger = logging.getLogger(__name__)

_WEIGHT = ".weight"


def _source_of(checkpoint_files: list[str] | None) -> SourceCheckpoint:
    if not checkpoint_files:
        raise OptionError("quantizing while loading needs the model's weight files; pass a folder or Hub repo id to "
                          "from_pretrained (not a state_dict), or load the model first and call qformat.quantize_")
    return SourceCheckpoint(Path(checkpoint_files[0]).parent)


def _skeleton(decision: ModuleDecision, linear: nn.Linear, outlier_threshold: float | None) -> QuantLinear:
    """The planned module's `QuantLinear` on meta, whose `weight` is, until the quantize op replaces it, a float32
    placeholder: transformers looks the checkpoint's `weight` up in the model before it quantizes it (a 2:4 module
    stores none), and some versions (5.17) read the weight in the placeholder's dtype, which must therefore be one
    that holds every stored float value exactly."""
    assert decision.scheme is not None
    module = QuantLinear(linear.in_features, linear.out_features, decision.scheme, bias=linear.bias is not None,
                         dtype=linear.weight.dtype, device="meta", scheme_name=decision.scheme_name or "",
                         outlier_threshold=outlier_threshold)
    module._parameters["weight"] = nn.Parameter(torch.empty(linear.weight.shape, dtype=torch.float32, device="meta"),
                                                requires_grad=False)
    return module


class OnLoadQuantization:
    """One model's quantization while it loads: the plan, the weights still to come, and what was measured."""

    def __init__(self, plan: ConversionPlan, recipe: QuantRecipe, checkpoint: SourceCheckpoint,
                 pending: dict[str, ModuleDecision], fp32_before: Any) -> None:
        self.plan = plan
        self.recipe = recipe
        self.checkpoint = checkpoint
        self.pending = pending  # model weight key -> decision, until transformers hands the weight over
        self.errors: dict[str, WeightError] = {}
        self._fp32_before = fp32_before

    @property
    def checkpoint_names(self) -> dict[str, str]:
        """Model module -> checkpoint module, of every quantized module."""
        return {d.module.module_path: d.module.name for d in self.plan.quantized}

    @classmethod
    def prepare(cls, model: nn.Module, recipe: QuantRecipe | None,
                checkpoint_files: list[str] | None) -> OnLoadQuantization:
        """Plan `model` (on meta) against its checkpoint and put a `QuantLinear` skeleton at every planned module."""
        assert recipe is not None
        checkpoint = _source_of(checkpoint_files)
        structure = structure_of(model, {name: t.shape for name, t in checkpoint.tensors.items()}, error=SourceError)
        plan = plan_conversion(structure, recipe)
        pending: dict[str, ModuleDecision] = {}
        for decision in plan.quantized:
            module = decision.module
            source = checkpoint.tensors[module.weight_key or ""]
            if source.dtype not in QUANTIZABLE_DTYPES:
                raise UnsupportedModelError(
                    f"{source.name} is stored as {source.dtype}, not a float type; qformat quantizes float weights "
                    "only (load the full-precision model)")
            linear = model.get_submodule(module.module_path)
            replace_module(model, module.module_path, _skeleton(decision, linear, recipe.outlier_threshold))
            pending[module.module_path + _WEIGHT] = decision
        before = model._keep_in_fp32_modules_strict
        model._keep_in_fp32_modules_strict = set(before or ()) | {f"^{re.escape(k)}$" for k in pending}
        logger.info("quantizing %d of %d Linear modules while loading", len(pending), len(plan.decisions))
        return cls(plan, recipe, checkpoint, pending, before)

    def quantize(self, key: str, tensor: torch.Tensor, model: nn.Module,
                 missing_keys: set[str] | None) -> dict[str, torch.Tensor]:
        """The stored tensors of the module whose weight `tensor` is (model key `key`), on `tensor`'s device."""
        decision = self.pending.pop(key)
        module = decision.module
        if tuple(tensor.shape) != (module.out_features, module.in_features):
            raise SourceError(f"{module.weight_key} is {list(tensor.shape)} but was planned as "
                              f"{[module.out_features, module.in_features]}; the checkpoint changed while it loaded")
        stored, self.errors[module.name] = quantize_module(tensor, decision)
        if "weight" not in stored:  # 2:4: drop the placeholder transformers looked the weight up through
            model.get_submodule(module.module_path)._parameters.pop("weight", None)
            if missing_keys is not None:
                missing_keys.discard(key)
        return {f"{module.module_path}.{suffix}": t for suffix, t in stored.items()}

    def finish(self, model: nn.Module) -> QFormatConfig:
        """Check every planned weight arrived and return the checkpoint config the model now matches."""
        model._keep_in_fp32_modules_strict = self._fp32_before
        if self.pending:
            names = ", ".join(sorted(d.module.name for d in self.pending.values())[:3])
            raise SourceError(f"transformers never loaded the weights of {names} ({len(self.pending)} planned "
                              "modules); the checkpoint does not hold what its header says: re-download it")
        return finished_config(model, self.plan, self.recipe, source_record(model, self.checkpoint), self.errors)
