"""How much each unit's quantization costs, estimated in one forward and backward pass per calibration batch.

For a unit whose quantization moves its output by dy (the QuantLinear's output minus the full-precision output on
the same input, so activation quantization counts too), the increase of the task's loss is, to second order,
1/2 * dy' F dy, with F the Fisher information of the model's predictions with respect to that output. The
estimate used here is the token-diagonal empirical form: with g the gradient of the log-likelihood of labels
sampled from the model's own predictions (`Task.fisher_objective`; a random orthogonal projection for embeddings),

    score(unit) = sum over calibration tokens t and members m of (g_t,m . dy_t,m)^2

which is E[(g . dy)^2] per token: the Fisher quadratic form restricted to one position at a time (cross-position
terms dropped, which keeps the variance low). All units are scored in the same pass with the rest of the model in
full precision: M units cost one forward and one backward per batch, not M evaluations. Interactions between units
are left to the search, which measures the real model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qformat.eval.tasks import Task
from qformat.search.variants import QuantizedVariants

__all__ = ["fisher_sensitivity"]


def _grad_from_embeddings(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the input embeddings' output a leaf that requires grad, so gradients reach every module output without
    any parameter requiring grad (no weight gradients are computed or stored)."""
    def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.detach().requires_grad_(True)

    return model.get_input_embeddings().register_forward_hook(hook)


def fisher_sensitivity(variants: QuantizedVariants, task: Task, *, seed: int = 0,
                       progress: bool = False) -> dict[str, float]:
    """Each unit's score (see the module docstring) on `task`'s batches; the model is in full precision during the
    pass and is left so."""
    model = variants.model
    variants.apply(u.name for u in variants.units)  # everything in full precision
    scores = {u.name: 0.0 for u in variants.units}
    unit_of = {m.module_path: u.name for u in variants.units for m in u.members}
    handles = [_grad_from_embeddings(model)]

    def make_hook(path: str) -> Callable[..., None]:
        quantized = variants.quantized[path]
        unit = unit_of[path]

        def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not out.requires_grad:
                return
            with torch.no_grad():
                dy = (quantized(args[0].detach()) - out.detach()).float()

            def on_grad(grad: torch.Tensor) -> None:
                scores[unit] += float(((grad.float() * dy).sum(-1) ** 2).sum())

            out.register_hook(on_grad)

        return hook

    for path in variants.full:
        handles.append(variants.full[path].register_forward_hook(make_hook(path)))
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        batches = task.batches
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="sensitivity", unit="batch", leave=False)
        for batch in batches:
            with torch.enable_grad():
                objective = task.fisher_objective(model, batch, generator)
                objective.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return scores
