"""transformers integration: quant_method "qformat" for `from_pretrained` and `save_pretrained`.

`register()` adds a `QuantizationConfigMixin` and an `HfQuantizer` to transformers' registries (idempotent); importing
this module calls it. That happens when qformat is imported and transformers' registry is already loaded, or,
through the `qformat-autoload.pth` hook installed with the package, as soon as transformers imports its quantizer
registry, so a user who never imports qformat still gets a correct model (see `_qformat_autoload`).

Loading: before the weights load, every `nn.Linear` whose checkpoint stores quantized tensors is replaced (on the
meta device) by a `QuantLinear` with parameters named and typed like those tensors, so transformers copies them in
bit-exact and nothing is ever materialized in full precision. After loading, each module prepares its kernel for
its device. `from_pretrained(..., quantization_config=QFormatQuantizationConfig(dequantize=True))` instead returns
plain `nn.Linear` layers in the model's dtype and drops the quantization config.

Saving: `save_pretrained` writes the modules' parameters as they are; the quantizer refreshes
`provenance.tensor_hashes` from exactly the tensors being saved, so the result verifies even when transformers
re-shards or the unquantized tensors changed dtype.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qformat.errors import FormatError
from qformat.io.safetensors_format import read_header
from qformat.nn.linear import QuantLinear
from qformat.spec.config import QUANT_METHOD, QFormatConfig

__all__ = ["QFormatHfQuantizer", "QFormatQuantizationConfig", "register"]

logger = logging.getLogger(__name__)


class QFormatQuantizationConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` for quant_method "qformat", as transformers handles it.

    It keeps the checkpoint's block verbatim (so `save_pretrained` writes it back unchanged) and validates it with
    `qformat.spec.QFormatConfig` (an unknown format version fails here, with an upgrade hint). `dequantize=True` is a
    loading option: pass `QFormatQuantizationConfig(dequantize=True)` to `from_pretrained` for a plain model.
    """

    def __init__(self, dequantize: bool = False, **data: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.dequantize = dequantize
        data.pop("quant_method", None)
        self._data = data
        self._spec = QFormatConfig.from_dict({"quant_method": QUANT_METHOD, **data}) if data else None

    @property
    def spec(self) -> QFormatConfig:
        if self._spec is None:
            raise FormatError("this QFormatQuantizationConfig holds only loading options, not a checkpoint's config")
        return self._spec

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"dequantize": self.dequantize}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **copy.deepcopy(self._data)}

    def __iter__(self):
        yield from self.to_dict().items()

    def set_tensor_hashes(self, hashes: dict[str, str]) -> None:
        provenance = dict(self._data.get("provenance") or {})
        provenance["tensor_hashes"] = dict(sorted(hashes.items()))
        self._data["provenance"] = provenance


def _quantized_in_checkpoint(checkpoint_files: list[str] | None) -> set[str] | None:
    """Module names that store quantized tensors (a `weight_scale`), read from the shard headers only."""
    if not checkpoint_files:
        return None
    names: set[str] = set()
    for file in checkpoint_files:
        if str(file).endswith(".safetensors"):
            names.update(k[: -len(".weight_scale")] for k in read_header(Path(file)).tensors if k.endswith(".weight_scale"))
    return names


def _checkpoint_name(name: str, known: set[str] | None, prefix: str) -> str | None:
    """The checkpoint's name for model module `name` (the model may add or drop `base_model_prefix`)."""
    candidates = [name, f"{prefix}.{name}" if prefix else name, name.removeprefix(f"{prefix}.") if prefix else name]
    if known is None:
        return name
    return next((c for c in candidates if c in known), None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _dequantize_modules(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            target = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.weight_scale.device, dtype=target)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            _replace(model, name, linear)
    return model


def _tensor_hash(tensor: torch.Tensor) -> str:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class QFormatHfQuantizer(HfQuantizer):
    """Loads qformat checkpoints into kernel-backed `QuantLinear` modules (pre-quantized checkpoints only)."""

    requires_calibration = True

    def __init__(self, quantization_config: QFormatQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        self.quantization_config.spec  # noqa: B018 - raises a clear error for a config without checkpoint data

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        spec = self.quantization_config.spec
        known = _quantized_in_checkpoint(checkpoint_files)
        prefix = getattr(model, "base_model_prefix", "") or ""
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            ckpt_name = _checkpoint_name(name, known, prefix)
            resolved = spec.scheme_for(ckpt_name) if ckpt_name is not None else None
            if resolved is None:
                continue  # kept in full precision (fallback list), or not a module of this checkpoint
            scheme_name, scheme = resolved
            _replace(model, name, QuantLinear(module.in_features, module.out_features, scheme,
                                              bias=module.bias is not None, dtype=module.weight.dtype,
                                              device=module.weight.device, scheme_name=scheme_name))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self.quantization_config.dequantize:
            return _dequantize_modules(model, getattr(model.config, "dtype", None))
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.prepare()
        return model

    def _dequantize(self, model, dtype=None):
        return _dequantize_modules(model, dtype)

    def get_state_dict_and_metadata(self, model):
        """Record the content hashes of exactly what `save_pretrained` is about to write."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(model.state_dict(), model)
        try:
            from transformers.core_model_loading import revert_weight_conversion

            state = revert_weight_conversion(model, state)
        except (ImportError, AttributeError):  # older transformers: no key conversions to revert
            pass
        self.quantization_config.set_tensor_hashes({name: _tensor_hash(t) for name, t in state.items()})
        return None, {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register quant_method "qformat" with transformers (safe to call any number of times)."""
    import transformers.quantizers.auto as auto

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(QFormatQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(QFormatHfQuantizer)
    if QFormatQuantizationConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, QFormatQuantizationConfig)
    logger.debug("registered quant_method %r with transformers", QUANT_METHOD)


# Importing this module registers it: the autoload hook (and `import qformat`) rely on that, and it is also what makes
# an import of this module from inside transformers' own import of its registry safe (no partial-module lookups).
register()
