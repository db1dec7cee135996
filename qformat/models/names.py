"""The one mapping between checkpoint names and model module names.

transformers renames checkpoint keys when it loads them (Llava's `language_model.model.*` becomes
`model.language_model.*`; a base model's keys gain or lose `base_model_prefix`) and renames them back when it saves.
qformat's configs name modules as the checkpoint does, while modules live in the model under the model's names.
Every qformat path that goes from one to the other (convert, load, quantize in memory, import/export, inspect) uses
`NameMap`, which asks transformers' own renaming, so the two sides can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["NameMap", "checkpoint_shapes", "saved_state_dict"]

#: The suffix by which a Linear module is looked up: every Linear has a `weight` in the model.
_WEIGHT = ".weight"


def _key_renamer(model: torch.nn.Module) -> Callable[[str], tuple[str, bool]]:
    """A function checkpoint key -> (model state-dict key, whether a WeightConverter takes the key), as
    transformers' loader renames keys (its renamings, converters and base-model-prefix handling)."""
    meta_sd = model.state_dict(keep_vars=True)  # values matter: transformers tests `.get(key) is not None`
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except Exception:  # older/newer transformers without this API: plain names with prefix handling
        rename_source_key, renamings, converters = None, [], []

    def rename(key: str) -> tuple[str, bool]:
        if rename_source_key is not None:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
            if renamed not in meta_sd and key in meta_sd:
                return key, False
            return renamed, pattern is not None
        if key in meta_sd or prefix is None:
            return key, False
        if key.startswith(prefix + ".") and key[len(prefix) + 1:] in meta_sd:
            return key[len(prefix) + 1:], False
        if f"{prefix}.{key}" in meta_sd:
            return f"{prefix}.{key}", False
        return key, False

    return rename


class NameMap:
    """Checkpoint key -> model key, and checkpoint module -> model module, for one model (meta or live).

    Build it before any module is replaced: lookups rely on the model's Linear modules still having `weight`.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._rename = _key_renamer(model)

    def key(self, checkpoint_key: str) -> tuple[str, bool]:
        """The model key a checkpoint key loads into, and whether transformers merges or splits it on load."""
        return self._rename(checkpoint_key)

    def module(self, checkpoint_module: str) -> str:
        """The model module a checkpoint module's tensors load into (whatever tensors it stores: the lookup goes
        through its `weight`, which every Linear has in the model)."""
        return self._rename(checkpoint_module + _WEIGHT)[0].removesuffix(_WEIGHT)


def saved_state_dict(model: torch.nn.Module, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes for `model`, by checkpoint name: tied copies dropped, transformers'
    load-time key conversions reverted. `meta=True` gives meta-device stand-ins (names, shapes and dtypes only), so
    reverting a conversion never touches the data."""
    state: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(state, model)
    except (ImportError, AttributeError, TypeError):  # not a transformers model, or an older transformers
        pass
    if meta:
        state = {name: torch.empty(t.shape, device="meta", dtype=t.dtype) for name, t in state.items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except (ImportError, AttributeError):  # older transformers: no key conversions to revert
        pass
    return state


def checkpoint_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """A live model's tensors as `save_pretrained` would name them in its checkpoint, name -> shape, in state-dict
    order (`saved_state_dict`)."""
    return {name: tuple(tensor.shape) for name, tensor in saved_state_dict(model, meta=True).items()}
