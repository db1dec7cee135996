"""The training loop of self-distilled quantization: teacher forward, student forward, the weighted loss terms,
one AdamW step; logged per step, saved every `save_every` steps, resumable.

Every random choice is a function of (seed, step): the batch (`TrainData.batch`), the noise masks
(`FakeQuantLinear`), and nothing draws from torch's global generator (dropout is off), so a run resumed from step k
computes what the uninterrupted run computed, and N processes compute what one does (up to the order of float
sums).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qformat.errors import FormatError, QFormatError
from qformat.train.data import TrainData
from qformat.train.distributed import Distributed
from qformat.train.fakequant import FakeQuantLinear
from qformat.train.losses import AttentionTap, attention_loss, output_loss, task_loss
from qformat.train.options import LOSS_TERMS, DistillOptions
from qformat.train.state import ADAMW_STATE, TrainingState, save_state

__all__ = ["Trainee", "TrainingLog", "train"]


@dataclass
class Trainee:
    """The models and what the loop reads of them: `kind` ("causal-lm" or "encoder"), the attention output paths
    and head count (empty: no attention term), the fake-quantized modules and the blocks FSDP shards."""

    teacher: nn.Module
    student: nn.Module
    kind: str
    fakes: list[FakeQuantLinear]
    attention_paths: list[str] = field(default_factory=list)
    heads: int = 0
    blocks: list[nn.Module] = field(default_factory=list)


@dataclass
class TrainingLog:
    """Per-step losses (each term's global mean, and the weighted total) and the wall time of the steps run here."""

    steps: list[dict[str, float]]
    seconds: float
    resumed_from: int | None

    def final(self, last: int = 10) -> dict[str, float]:
        """Each logged value averaged over the last `last` steps (the figure provenance and the card show)."""
        tail = self.steps[-last:]
        keys = [k for k in tail[0] if k != "step"] if tail else []
        return {k: sum(s[k] for s in tail) / len(tail) for k in keys}


class NonFiniteLossError(QFormatError, ValueError):
    """A training step produced NaN or Inf."""


def _terms(trainee: Trainee, options: DistillOptions, batch: dict[str, torch.Tensor], t_out: Any, s_out: Any,
           t_att: list[torch.Tensor], s_att: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
    weights = options.loss_weights
    mask = batch.get("attention_mask")
    terms: dict[str, tuple[torch.Tensor, int]] = {}
    if weights.task:
        task = task_loss(trainee.kind, s_out, batch)
        if task is not None:
            terms["task"] = task
    if weights.output:
        terms["output"] = output_loss(trainee.kind, t_out, s_out, mask, options.temperature)
    if weights.attention and trainee.attention_paths:
        terms["attention"] = attention_loss(t_att, s_att, trainee.heads, mask)
    return terms


def _load_parameters(trainee: Trainee, state: TrainingState) -> None:
    params = dict(trainee.student.named_parameters())
    with torch.no_grad():
        for name, tensor in state.parameters.items():
            params[name].copy_(tensor)


def _load_optimizer(optimizer: torch.optim.Optimizer, state: TrainingState) -> None:
    """The saved moments into `optimizer`. Its hyperparameters stay this run's (they equal the saved run's: the run
    identity was checked), so nothing but the tensors is read from the state folder."""
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.optimizer["state"].items():
        fits = index < len(ordered) and set(entry) == set(ADAMW_STATE) \
            and entry["step"].numel() == 1 and bool(torch.isfinite(entry["step"]).all()) \
            and all(entry[k].shape == ordered[index].shape and entry[k].dtype == ordered[index].dtype
                    for k in ("exp_avg", "exp_avg_sq"))
        if not fits:
            raise FormatError("the saved optimizer state does not fit the model; start afresh")
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state.optimizer["state"], "param_groups": current["param_groups"]})


def train(trainee: Trainee, data: TrainData, options: DistillOptions, *, dist: Distributed,
          state_dir: Path | None = None, resume: TrainingState | None = None, run: dict[str, Any] | None = None,
          progress: bool = False) -> TrainingLog:
    """Train `trainee.student` (in place) for `options.steps` steps; return the loss log."""
    teacher, student = trainee.teacher, trainee.student
    teacher.eval()
    student.eval()  # dropout off ...
    for fake in trainee.fakes:
        fake.train(True)  # ... quantization noise on
    if resume is not None:  # into the plain parameters, before DDP broadcasts them
        _load_parameters(trainee, resume)
    model = dist.wrap(student, trainee.blocks)  # first: FSDP replaces the parameters with sharded ones
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    log: list[dict[str, float]] = []
    start = 0
    if resume is not None:
        _load_optimizer(optimizer, resume)
        start, log = resume.step, list(resume.log)
    t_tap = AttentionTap(teacher, trainee.attention_paths)
    s_tap = AttentionTap(student, trainee.attention_paths)
    bar = None
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=options.steps, initial=start, desc="distill", unit="step")
    began = time.perf_counter()
    for step in range(start, options.steps):
        for group in optimizer.param_groups:
            group["lr"] = options.lr_at(step)
        for fake in trainee.fakes:
            fake.set_step(step)
        batch = {k: v.to(dist.device) for k, v in data.batch(step, options.batch_size, options.seed,
                                                                rank=dist.rank, world=dist.world).items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        extra = {"use_cache": False} if trainee.kind == "causal-lm" else {}
        with torch.no_grad(), t_tap.capture() as t_att:
            t_out = teacher(**inputs, **extra)
        with s_tap.capture() as s_att:
            s_out = model(**inputs, **extra)
        terms = _terms(trainee, options, batch, t_out, s_out, t_att, s_att)
        names = list(terms)
        sums = dist.all_sum([float(terms[n][0].detach()) for n in names] + [float(terms[n][1]) for n in names])
        means = {n: sums[i] / max(sums[len(names) + i], 1.0) for i, n in enumerate(names)}
        loss = sum(getattr(options.loss_weights, n) * terms[n][0] * (dist.world / max(sums[len(names) + i], 1.0))
                   for i, n in enumerate(names))
        total = sum(getattr(options.loss_weights, n) * means[n] for n in names)
        if not math.isfinite(total):
            terms_text = ", ".join(f"{k}={v:.4g}" for k, v in means.items())
            raise NonFiniteLossError(f"step {step}: the loss is {total} ({terms_text}); lower --lr, or check the data "
                                     "and the source weights")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": float(step), **{n: means.get(n, float("nan")) for n in LOSS_TERMS if n in means},
                    "total": total})
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()}, refresh=False)
            bar.update(1)
        done = step + 1
        if state_dir is not None and options.save_every and done % options.save_every == 0 and done < options.steps:
            if dist.is_main:
                save_state(state_dir, step=done, run=run or {}, log=log, model=student, optimizer=optimizer)
            dist.barrier()
        del t_out, s_out, terms, loss
    if bar is not None:
        bar.close()
    return TrainingLog(log, time.perf_counter() - began, resume.step if resume is not None else None)
