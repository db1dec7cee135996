"""SDQ's loss terms, each as (sum over this process's items, item count), so that a distributed run can divide by
the global count and match one process exactly.

- task: the model's own loss on the data: next-token cross-entropy for a causal LM (padding excluded), cross-entropy
  on the labels for a sequence classifier; per token or per sequence.
- output: KL(teacher || student) of the output distributions at temperature T, times T² (Hinton et al.): per token
  over the vocabulary for a causal LM, per sequence over the classes for a classifier; for an encoder without a
  head (sentence embeddings), 1 - cosine of the last hidden states, per token.
- attention: for every self-attention block, per layer and head, the KL divergence between the teacher's and the
  student's *self-attention output relations*: with O the head's output (the tokens' value mixtures that the output
  projection reads, [T, d]), softmax(O Oᵀ / √d) over the sequence's tokens is, per query token, a distribution
  (MiniLM-v2's relation transfer applied to the attention output, where SDQ finds quantization error largest). Per
  (layer, head, query token); padding excluded as query and as key.

The attention outputs are read by forward pre-hooks on each block's output projection (`attention_outputs`), so
any attention implementation works (eager, SDPA, flash), and the student's are read before its activation
quantization, as the teacher's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qformat.errors import UnsupportedModelError

__all__ = ["ATTENTION_OUTPUT_PATTERNS", "AttentionTap", "attention_heads", "attention_loss", "attention_outputs",
           "output_loss", "task_loss"]

#: Module paths of the Linear that reads the concatenated head outputs of a self-attention block, per family:
#: Llama/Mistral/Qwen/Gemma (`self_attn.o_proj`), OPT/BART (`self_attn.out_proj`), BERT/RoBERTa/XLM-R/MiniLM
#: (`attention.output.dense`), GPT-NeoX (`attention.dense`), GPT-2 style (`attn.c_proj`).
ATTENTION_OUTPUT_PATTERNS = (
    r"(?:^|\.)self_attn\.o_proj$",
    r"(?:^|\.)self_attn\.out_proj$",
    r"(?:^|\.)attention\.output\.dense$",
    r"(?:^|\.)attention\.dense$",
    r"(?:^|\.)attn\.c_proj$",
)


def attention_heads(config: Any) -> int:
    """The number of attention heads of a transformers config (its text config for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise UnsupportedModelError("the model's config does not say how many attention heads it has; "
                                    "run qformat distill with --loss-weights attention=0")
    return heads


def attention_outputs(model: nn.Module) -> list[str]:
    """The module paths of the model's self-attention output projections, in model order."""
    patterns = [re.compile(p) for p in ATTENTION_OUTPUT_PATTERNS]
    return [name for name, _ in model.named_modules() if name and any(p.search(name) for p in patterns)]


class AttentionTap:
    """Collects the inputs of the modules at `paths` (the heads' outputs, side by side) during a forward."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.model, self.paths = model, paths
        self.outputs: list[torch.Tensor] = []
        self._handles: list[Any] = []

    @contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        self.outputs = []

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            self.outputs.append(args[0])

        self._handles = [self.model.get_submodule(p).register_forward_pre_hook(hook) for p in self.paths]
        try:
            yield self.outputs
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []


def _valid(mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    return mask.to(device=device, dtype=torch.bool) if mask is not None else torch.ones(shape, dtype=torch.bool,
                                                                                         device=device)


def _log_relation(output: torch.Tensor, heads: int, keys: torch.Tensor) -> torch.Tensor:
    """log softmax(O Oᵀ / √d) per head of a self-attention output [B, T, H·d], padding keys masked: [B, H, T, T]."""
    b, length, width = output.shape
    d = width // heads
    o = output.float().reshape(b, length, heads, d).transpose(1, 2)  # [B, H, T, d]
    scores = o @ o.transpose(-1, -2) / math.sqrt(d)
    return F.log_softmax(scores.masked_fill(~keys, float("-inf")), dim=-1)


def attention_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], heads: int,
                   mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Sum over layers, heads and valid query tokens of KL(teacher relation || student relation), and the count."""
    if len(teacher) != len(student) or not teacher:
        raise UnsupportedModelError("the teacher's and student's attention outputs differ in number; run qformat "
                                    "distill with --loss-weights attention=0")
    total = student[0].new_zeros((), dtype=torch.float32)
    count = 0
    for t_out, s_out in zip(teacher, student):
        b, length, _ = s_out.shape
        valid = _valid(mask, (b, length), s_out.device)
        keys = valid[:, None, None, :]  # [B, 1, 1, T]
        with torch.no_grad():
            log_t = _log_relation(t_out.detach(), heads, keys)
        log_s = _log_relation(s_out, heads, keys)
        kl = torch.where(keys, log_t.exp() * (log_t - log_s), 0.0).sum(-1)  # [B, H, T]
        queries = valid[:, None, :].expand(b, heads, length)
        total = total + kl[queries].sum()
        count += int(queries.sum())
    return total, count


def output_loss(kind: str, teacher: Any, student: Any, mask: torch.Tensor | None,
                temperature: float) -> tuple[torch.Tensor, int]:
    """The output term (sum, count) for a model of `kind` from the teacher's and student's forward outputs."""
    logits_s = getattr(student, "logits", None)
    if logits_s is None:  # an encoder without a head: its last hidden states
        hs, ht = student.last_hidden_state.float(), teacher.last_hidden_state.float().detach()
        valid = _valid(mask, hs.shape[:2], hs.device)
        loss = 1 - F.cosine_similarity(hs, ht, dim=-1)
        return loss[valid].sum(), int(valid.sum())
    logits_t = teacher.logits.detach().float()
    logits_s = logits_s.float()
    t = temperature
    log_t = F.log_softmax(logits_t / t, dim=-1)
    log_s = F.log_softmax(logits_s / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) * t * t  # [B, T] or [B]
    if kl.dim() == 2:
        valid = _valid(mask, kl.shape, kl.device)
        return kl[valid].sum(), int(valid.sum())
    return kl.sum(), kl.numel()


def task_loss(kind: str, student: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int] | None:
    """The task term (sum, count), or None where the model has no task loss on this data (an encoder without a
    head, or a classifier without labels)."""
    logits = getattr(student, "logits", None)
    if logits is None:
        return None
    if kind == "causal-lm":
        ids = batch["input_ids"]
        valid = _valid(batch.get("attention_mask"), ids.shape, ids.device)[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        return nll[valid].sum(), int(valid.sum())
    if "labels" not in batch or logits.dim() != 2:
        return None
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), logits.shape[0]
