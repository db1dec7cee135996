"""`InputMaxima`: forward pre-hooks that record each watched Linear's per-input-channel max |x|."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

__all__ = ["InputMaxima"]


class InputMaxima:
    """While entered, every forward of a watched module updates `maxima[name]`: the max |x| of each input channel
    (the last dimension) over every token seen, in float32 on the module's device. A NaN in the input propagates
    into the maximum (callers decide what an unusable statistic means); a module never run has no entry."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.maxima: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            current = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            seen = self.maxima.get(name)
            self.maxima[name] = current if seen is None else torch.maximum(seen, current)

        return record

    def __enter__(self) -> InputMaxima:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
