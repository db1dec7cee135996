"""Tiny compressed-tensors checkpoints written by compressed-tensors itself, to judge `qformat import` against.

`save_ct_checkpoint` quantizes a tiny random model with compressed-tensors' own API: `apply_quantization_config`
attaches the scheme, `calculate_qparams` computes absmax scales from each weight (what a min-max observer gives),
and `ModelCompressor` compresses and writes the checkpoint and its config, exactly as llm-compressor does at the end
of a run. No calibration data: static activation scales get a fixed value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qformat.testing.tiny_models import build_tiny_model

__all__ = ["prune_2_4_", "save_ct_checkpoint"]

#: The static activation scale given to every module of a static scheme (no calibration data here).
STATIC_INPUT_SCALE = 0.02


def prune_2_4_(weight: torch.Tensor) -> None:
    """Zero the two smallest |w| of every 4 consecutive input columns, in place (the 2:4 pattern)."""
    rows, cols = weight.shape
    groups = weight.detach().float().reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    weight.data.copy_(torch.where(keep, groups, 0.0).reshape(rows, cols).to(weight.dtype))


def _scheme(scheme: str | dict[str, Any], targets: list[str]):
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    if isinstance(scheme, str):
        return preset_name_to_scheme(scheme, targets)
    return QuantizationScheme(targets=targets, **scheme)


def save_ct_checkpoint(folder: Path, groups: dict[str, tuple[str | dict[str, Any], list[str]]], *,
                       arch: str = "llama", ignore: tuple[str, ...] = ("lm_head",), dtype: torch.dtype = torch.bfloat16,
                       prune_2_4: bool = False, quantization_format: str | None = None, seed: int = 0) -> Path:
    """Write a compressed-tensors checkpoint of the tiny `arch` model to `folder` and return it.

    `groups` maps a config group name to (a preset name such as "W8A8" or QuantizationScheme fields, targets).
    `prune_2_4` prunes every Linear but the ignored ones to 2:4 first (the weights are then stored dense).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    model = build_tiny_model(arch, seed=seed, dtype=dtype)
    if prune_2_4:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name not in ignore:
                prune_2_4_(module.weight)
    config = QuantizationConfig(config_groups={g: _scheme(s, t) for g, (s, t) in groups.items()}, ignore=list(ignore))
    apply_quantization_config(model, config)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        w = module.weight.detach()
        if scheme.weights.strategy == "tensor":
            low, high = w.amin().reshape(1), w.amax().reshape(1)
        elif scheme.weights.strategy == "group":
            grouped = w.reshape(w.shape[0], -1, scheme.weights.group_size)
            low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
        else:
            low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        scale, _ = calculate_qparams(low, high, scheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            module.input_scale.data.fill_(STATIC_INPUT_SCALE)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=quantization_format)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return Path(folder)
