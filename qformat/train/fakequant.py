"""The student's Linear layers: full-precision weights that train, seen through the converter's quantization.

`FakeQuantLinear` keeps the module's float weight as a trainable parameter. Its forward quantizes that weight with
the converter's exact arithmetic (`qformat.plan.execute.quantize_module`: the planned scheme, observer and 2:4
selection), and

- while training, applies the quantization error `dequant(quant(w)) - w` to a random subset of blocks of input
  columns (Quant-Noise; `noise_rate` 1 means all of it) through a straight-through estimator, so the gradient
  reaches the float weight as if quantization were the identity, and fake-quantizes the input activations the way
  the scheme does at run time (dynamic per token), again straight through;
- in evaluation mode, runs the very `QuantLinear` a loaded checkpoint runs, built from those stored tensors (cached
  until the weight changes): the student's evaluation forward *is* the written checkpoint's forward.

Which blocks are quantized is drawn from a generator seeded by (run seed, step, module index), never from torch's
global RNG, so every process of a distributed run and a resumed run draw the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qformat.kernels.activations import fake_quantize
from qformat.nn.linear import QuantLinear
from qformat.nn.swap import replace_module
from qformat.plan.execute import quantize_module
from qformat.plan.rules import ConversionPlan, ModuleDecision

__all__ = ["FakeQuantLinear", "attach_fake_quant", "detach_fake_quant", "noise_seed"]


def noise_seed(seed: int, step: int, index: int) -> int:
    """The seed of module `index`'s noise mask at `step` (a fixed mixing of the three, below 2**63)."""
    return (seed * 1_000_003 + step) * 10_007 + index & (2**63 - 1)


class FakeQuantLinear(nn.Module):
    """A Linear whose float `weight` trains while its forward sees the quantized weight (see the module docstring).

    `noise_rate` is the share of blocks (of `noise_block` input columns of one row) quantized per training step;
    `set_step(step)` picks that step's blocks. The module shares `weight` and `bias` with the `nn.Linear` it wraps
    (`attach_fake_quant`), so the optimizer's parameters and the model's state dict keep their names."""

    def __init__(self, linear: nn.Linear, decision: ModuleDecision, *, index: int, seed: int = 0,
                 noise_rate: float = 1.0, noise_block: int = 8) -> None:
        super().__init__()
        assert decision.scheme is not None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.decision = decision
        self.scheme = decision.scheme
        self.index, self.seed = index, seed
        self.noise_rate, self.noise_block = noise_rate, noise_block
        self.step = 0
        # the QuantLinear of the current weight, kept out of the module tree (not a submodule: its tensors are not
        # the student's parameters, state or DDP buckets): {"module": ..., "version": (weight, bias) versions}
        self._cache: dict[str, object] = {}

    # -- the converter's tensors ---------------------------------------------------------------------------------
    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors the checkpoint stores for the current weight (suffix -> tensor)."""
        stored, _error = quantize_module(self.weight.detach(), self.decision)
        return stored

    def quantized_module(self) -> QuantLinear:
        """The `QuantLinear` a checkpoint written now would load (cached until the weight or bias changes; its kernel
        is prepared on its first call)."""
        version = tuple((id(t), t.data_ptr(), t._version) for t in (self.weight, self.bias) if t is not None)
        if self._cache.get("version") != version:
            bias = self.bias.detach().clone() if self.bias is not None else None
            self._cache["module"] = QuantLinear.from_stored(self.stored(), self.scheme, bias=bias,
                                                            scheme_name=self.decision.scheme_name or "")
            self._cache["version"] = version
        module = self._cache["module"]
        assert isinstance(module, QuantLinear)
        return module

    def set_step(self, step: int) -> None:
        self.step = step

    def _mask(self, like: torch.Tensor) -> torch.Tensor | None:
        """This step's blocks to quantize ([out, in] of 0/1 in `like`'s dtype), None when all are."""
        if self.noise_rate >= 1.0:
            return None
        blocks = -(-self.in_features // self.noise_block)
        generator = torch.Generator().manual_seed(noise_seed(self.seed, self.step, self.index))
        chosen = torch.rand(self.out_features, blocks, generator=generator) < self.noise_rate
        mask = chosen.repeat_interleave(self.noise_block, dim=1)[:, : self.in_features]
        return mask.to(device=like.device, dtype=like.dtype)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.quantized_module()(x)
        w = self.weight
        with torch.no_grad():
            # no cache while training: the weight changes every step (and under FSDP it is a new tensor each time)
            stored = QuantLinear.from_stored(self.stored(), self.scheme, bias=None)
            error = stored.dequantized_weight(torch.float32).to(w.dtype) - w
            mask = self._mask(error)
            if mask is not None:
                error.mul_(mask)
        w_q = w + error  # straight through: d(w_q)/dw = 1
        acts = self.scheme.input_activations
        if acts is not None:
            with torch.no_grad():
                x_error = fake_quantize(x.detach().reshape(-1, x.shape[-1]), acts.type).reshape(x.shape) - x
            x = x + x_error
        return F.linear(x, w_q, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.decision.scheme_name}, noise_rate={self.noise_rate:g}")


def attach_fake_quant(model: nn.Module, plan: ConversionPlan, *, seed: int = 0, noise_rate: float = 1.0,
                      noise_block: int = 8) -> list[FakeQuantLinear]:
    """Replace every Linear `plan` quantizes with a `FakeQuantLinear` sharing its parameters; return them in plan
    order (their index seeds their noise)."""
    modules = []
    for index, decision in enumerate(plan.quantized):
        path = decision.module.module_path
        linear = model.get_submodule(path)
        fake = FakeQuantLinear(linear, decision, index=index, seed=seed, noise_rate=noise_rate,
                               noise_block=noise_block)
        fake.train(linear.training)
        replace_module(model, path, fake)
        modules.append(fake)
    return modules


def detach_fake_quant(model: nn.Module, modules: list[FakeQuantLinear]) -> None:
    """Put plain `nn.Linear` modules holding the trained parameters back (the model is a full-precision model
    again, ready for `qformat.loaders.inplace.apply_recipe`)."""
    for fake in modules:
        linear = nn.Linear(fake.in_features, fake.out_features, bias=fake.bias is not None, device="meta")
        linear.weight = fake.weight
        if fake.bias is not None:
            linear.bias = fake.bias
        replace_module(model, fake.decision.module.module_path, linear)
