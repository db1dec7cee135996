"""Swapping modules of a model in place: the one way qformat replaces a `nn.Linear` by another module."""

from __future__ import annotations

from torch import nn

__all__ = ["replace_module"]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` (a `named_modules()` name) in `model`; return the module it replaces."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent.get_submodule(child)
    setattr(parent, child, new)
    return old
