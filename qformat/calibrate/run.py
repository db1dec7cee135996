"""Run a model over calibration text with `InputMaxima` hooks: the text is cut into the same windows (causal LMs) or
paragraph batches (encoders, seq2seq) `qformat eval` uses (`qformat.eval.tasks.make_task`), so its identity (label,
SHA-256, tokens) is recorded the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qformat.calibrate.hooks import InputMaxima
from qformat.errors import OptionError
from qformat.eval.data import EvalText

__all__ = ["input_maxima"]


@torch.inference_mode()
def input_maxima(model: nn.Module, tokenizer: Any, text: EvalText, modules: Mapping[str, nn.Module], *,
                 max_tokens: int, progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-input-channel max |x| of each of `modules` (name -> module of `model`) over at most `max_tokens` tokens
    of `text` (float32, on CPU), and the text's identity record. Padding positions of paragraph batches count too
    (causal-LM windows have none)."""
    from qformat.eval.tasks import make_task

    task = make_task(model, tokenizer, text, max_tokens=max_tokens, progress=progress)
    if not task.batches:
        raise OptionError(f"{text.label} gave no tokens to calibrate on; give a longer text")
    device = next(model.parameters()).device
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    was_training = model.training
    model.eval()
    try:
        with InputMaxima(modules) as hooks:
            for batch in task.batches:
                inputs = {k: v.to(device) for k, v in batch.items()}
                if seq2seq:
                    inputs["decoder_input_ids"] = inputs["input_ids"]
                    inputs.pop("labels", None)
                model(**inputs)
    finally:
        model.train(was_training)
    return {name: m.cpu() for name, m in hooks.maxima.items()}, task.identity()
