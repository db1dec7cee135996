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

Checks: a checkpoint is untrusted input, and transformers would silently cast a tensor of the wrong dtype into a
parameter, leave a missing one uninitialized, or load quantized tensors into a plain layer. So the loader refuses,
with one `FormatError` naming the tensor, a checkpoint that breaks the format: before loading, from the shard
headers, every tensor a quantized module's scheme needs must be stored with its dtype and shape
(`qformat.spec.layout.module_tensors`), and no quantized tensor (`weight_scale`, `input_scale`, `compressed`,
`bitmask`, or int8/fp8 data) may belong to a module the model keeps in full precision; after loading, each module's
values must be valid (`QuantLinear.stored_value_problem`: scales finite and positive, fp8 without NaN, 2:4 bitmasks
keeping two of every four).

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
from qformat.io.safetensors_format import HeaderEntry, read_header
from qformat.nn.linear import QuantLinear
from qformat.spec.config import QUANT_METHOD, CheckpointConfig
from qformat.spec.layout import WEIGHT_SUFFIXES, TensorSpec, module_tensors, shape_problem, stored_tensors_problem
from qformat.spec.schemes import Scheme

__all__ = ["QFormatHfQuantizer", "QFormatQuantizationConfig", "register"]

logger = logging.getLogger(__name__)

#: Private switch for benchmarks/load_checks.py, which measures what the load-time checks cost. Nothing else may turn
#: it off: without the checks a damaged or tampered checkpoint loads as a silently wrong model.
_CHECKS = True

#: Header dtypes that only a quantized module's tensors may have.
_QUANTIZED_DTYPES = frozenset({"I8", "F8_E4M3", "F8_E5M2"})
#: Tensor-name suffixes that only a quantized module has (`weight` and `shape` are common names).
_QUANTIZED_SUFFIXES = frozenset(WEIGHT_SUFFIXES) - {"weight", "shape"}
#: What a user can do about a checkpoint the loader refuses.
_ADVICE = ("the checkpoint is damaged or was modified: re-download or re-convert it "
           "(`qformat verify` names every problem)")


class QFormatQuantizationConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` for quant_method "qformat", as transformers handles it.

    It keeps the checkpoint's block verbatim (so `save_pretrained` writes it back unchanged) and validates it with
    `qformat.spec.CheckpointConfig` (an unknown format version fails here, with an upgrade hint). `dequantize=True` is a
    loading option: pass `QFormatQuantizationConfig(dequantize=True)` to `from_pretrained` for a plain model.
    """

    def __init__(self, dequantize: bool = False, **data: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.dequantize = dequantize
        data.pop("quant_method", None)
        self._data = data
        self._spec = CheckpointConfig.from_dict({"quant_method": QUANT_METHOD, **data}) if data else None

    @property
    def spec(self) -> CheckpointConfig:
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


def _stored_tensors(checkpoint_files: list[str] | None) -> dict[str, HeaderEntry] | None:
    """Every tensor the checkpoint stores, from the shard headers only (None if transformers named no files).

    qformat checkpoints are safetensors files (docs/FORMAT.md section 12); any other weight file is refused, since
    the loader could not check what it holds.
    """
    if not checkpoint_files:
        return None
    tensors: dict[str, HeaderEntry] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise FormatError(f"{Path(file).name} is not a safetensors file; qformat checkpoints store their "
                              f"tensors in safetensors files only: {_ADVICE}")
        tensors.update(read_header(Path(file), tensors_before=len(tensors)).tensors)
    return tensors


def _check_layer_counts_before_building(config: Any) -> None:
    """`check_layer_counts` on a config whose `_name_or_path` is a local checkpoint folder (read from its shard
    headers only). A Hub repo id is not resolved to files yet at this point: transformers builds it unchecked."""
    from qformat.checkpoint.reader import open_checkpoint
    from qformat.models.structure import check_layer_counts

    folder = Path(str(getattr(config, "_name_or_path", "") or ""))
    if not str(folder) or not (folder / "config.json").is_file():
        return
    checkpoint = open_checkpoint(folder)
    check_layer_counts(config.to_dict(), {name: entry.shape for name, (_, entry) in checkpoint.tensors.items()},
                       FormatError)


def _is_quantized(name: str, entry: HeaderEntry) -> bool:
    """Whether a stored tensor is quantized data: a quantized-only name, or an int8/fp8 dtype."""
    return name.rpartition(".")[2] in _QUANTIZED_SUFFIXES or entry.dtype in _QUANTIZED_DTYPES


def _quantized_modules(stored: dict[str, HeaderEntry]) -> set[str]:
    """Checkpoint modules that store any quantized tensor (so a module missing its `weight_scale` still counts)."""
    return {name.rpartition(".")[0] for name, entry in stored.items() if _is_quantized(name, entry)}


def _fail(name: str, problem: str) -> FormatError:
    return FormatError(f"{name}: {problem}; {_ADVICE}")


def _check_module_header(stored: dict[str, HeaderEntry], module: str, scheme_name: str,
                         specs: list[TensorSpec]) -> None:
    """Every tensor the scheme needs is stored with its dtype and shape, and no other quantized tensor of `module`."""
    found = stored_tensors_problem(stored, module, specs)
    if found is None:
        return
    name, kind = found
    if kind == "missing":
        raise _fail(module, f"misses {name}, which scheme {scheme_name} needs")
    if kind == "extra":
        raise _fail(name, f"is not part of scheme {scheme_name}")
    entry, spec = stored[name], next(spec for spec in specs if spec.name == name)
    raise _fail(name, f"is {entry.dtype} {list(entry.shape)}, scheme {scheme_name} needs {spec.dtype} "
                      f"{list(spec.shape)}")


def _check_scheme_fits(stored: dict[str, HeaderEntry], module: str, scheme_name: str, scheme: Scheme,
                       linear: nn.Linear) -> None:
    """The model's Linear `module` may take `scheme` (shape rules) and the checkpoint stores its tensors as the
    scheme says (`qformat.spec.layout.module_tensors` is the one source of names, dtypes and shapes)."""
    problem = shape_problem(scheme, linear.out_features, linear.in_features)
    if problem is not None:
        raise _fail(module, f"{problem} (format v1 keeps such modules in full precision)")
    _check_module_header(stored, module, scheme_name, module_tensors(module, scheme, linear.out_features,
                                                                     linear.in_features))


def _model_module(module: str, model_modules: set[str], prefix: str) -> str | None:
    """The model's module that checkpoint module `module` would load into, or None if the model has none."""
    return next((c for c in _prefix_variants(module, prefix) if c in model_modules), None)


def _check_nothing_quantized_elsewhere(stored: dict[str, HeaderEntry], quantized: set[str], model: nn.Module,
                                       prefix: str) -> None:
    """No quantized tensor belongs to a module of the model that is not a `QuantLinear` (it would be cast into a
    float parameter, or its scale ignored). Tensors of modules this model lacks are dropped by transformers."""
    model_modules = {name for name, _ in model.named_modules()}
    for name, entry in stored.items():
        module = name.rpartition(".")[0]
        if module in quantized or not _is_quantized(name, entry):
            continue
        target = _model_module(module, model_modules, prefix)
        if target is not None:
            kind = type(model.get_submodule(target)).__name__
            raise _fail(name, f"is quantized data ({entry.dtype}), but the model loads {module or 'its root'} ({kind}) "
                              "in full precision: the config keeps it out of quantization, or it is not a Linear layer")


def _check_values(model: nn.Module, checkpoint_names: dict[str, str]) -> None:
    """Each `QuantLinear`'s stored values, as loaded (see `QuantLinear.stored_value_problem`)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            problem = module.stored_value_problem()
            if problem is not None:
                tensor, what = problem
                raise _fail(f"{checkpoint_names.get(name, name)}.{tensor}", what)


def _prefix_variants(name: str, prefix: str) -> tuple[str, ...]:
    """`name` as is, with `base_model_prefix` added and with it dropped: the names the same module may have on the
    other side (checkpoint or model)."""
    return (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if prefix else (name,)


def _checkpoint_name(name: str, known: set[str] | None, prefix: str) -> str | None:
    """The checkpoint's name for model module `name` (the model may add or drop `base_model_prefix`)."""
    if known is None:
        return name
    return next((c for c in _prefix_variants(name, prefix) if c in known), None)


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
        self._checkpoint_names: dict[str, str] = {}  # model module -> checkpoint module, for error messages

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        self.quantization_config.spec  # noqa: B018 - raises a clear error for a config without checkpoint data

    def update_attn_implementation(self, config):
        """transformers' last quantizer hook before it builds the model (recent versions; older ones never call
        it): refuse a config.json that asks for more layers than a local checkpoint's weights hold, before building
        100,000 layers takes minutes and gigabytes (the rule `qformat verify` applies)."""
        _check_layer_counts_before_building(config)
        parent = getattr(super(), "update_attn_implementation", None)
        return parent(config) if parent is not None else config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        spec = self.quantization_config.spec
        stored = _stored_tensors(checkpoint_files)
        known = None if stored is None else _quantized_modules(stored)
        prefix = getattr(model, "base_model_prefix", "") or ""
        self._checkpoint_names = {}
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            ckpt_name = _checkpoint_name(name, known, prefix)
            resolved = spec.scheme_for(ckpt_name) if ckpt_name is not None else None
            if resolved is None:
                continue  # kept in full precision (fallback list), or not a module of this checkpoint
            scheme_name, scheme = resolved
            if stored is not None and _CHECKS:
                _check_scheme_fits(stored, ckpt_name, scheme_name, scheme, module)
            _replace(model, name, QuantLinear(module.in_features, module.out_features, scheme,
                                              bias=module.bias is not None, dtype=module.weight.dtype,
                                              device=module.weight.device, scheme_name=scheme_name))
            self._checkpoint_names[name] = ckpt_name
        if stored is not None and _CHECKS:
            _check_nothing_quantized_elsewhere(stored, set(self._checkpoint_names.values()), model, prefix)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if _CHECKS:
            _check_values(model, self._checkpoint_names)
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
