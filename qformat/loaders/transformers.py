"""transformers integration: quant_method "qformat" for `from_pretrained` and `save_pretrained`.

`register()` adds `QFormatConfig` (qformat.loaders.config) and an `HfQuantizer` to transformers' registries
(idempotent); importing this module calls it. That happens when qformat is imported and transformers' registry is already loaded, or,
through the `qformat-autoload.pth` hook installed with the package, as soon as transformers imports its quantizer
registry, so a user who never imports qformat still gets a correct model (see `_qformat_autoload`).

Loading a qformat checkpoint: before the weights load, every `nn.Linear` whose checkpoint stores quantized tensors
is replaced (on the meta device) by a `QuantLinear` with parameters named and typed like those tensors, so
transformers copies them in bit-exact and nothing is ever materialized in full precision. Checkpoint modules are
found in the model through `qformat.models.NameMap`, transformers' own key renaming (Llava's `language_model.*`),
the mapping the converter used. After loading, each module prepares its kernel for its device.
`from_pretrained(..., quantization_config=QFormatConfig(dequantize=True))` instead returns plain `nn.Linear` layers
in the model's dtype and drops the quantization config.

Quantizing while loading (`quantization_config=QFormatConfig(scheme=...)` on a full-precision model): the model's
structure and the checkpoint's tensors are planned with the converter's rules (`qformat.plan.plan_conversion` on
`qformat.models.structure_of`); each planned `nn.Linear` becomes a `QuantLinear` on meta, and each weight is
quantized by `quantize_weight` the moment transformers reads it, on the device it is loaded to, from the stored
values (the weight is read in float32 whatever `dtype` the model loads in), so the tensors equal what
`qformat convert` writes. After loading, the config becomes the checkpoint's block a conversion would have written,
so `save_pretrained` writes a qformat checkpoint.

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
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from qformat.errors import FormatError, OptionError
from qformat.io.dtypes import tensor_bytes
from qformat.io.safetensors_format import HeaderEntry, read_header
from qformat.loaders.config import QFormatConfig
from qformat.loaders.on_load import OnLoadQuantization
from qformat.models.names import NameMap, saved_state_dict
from qformat.nn.linear import QuantLinear
from qformat.nn.swap import replace_module
from qformat.plan.recipe import AUTO_DTYPE
from qformat.spec.config import QUANT_METHOD
from qformat.spec.layout import WEIGHT_SUFFIXES, TensorSpec, module_tensors, shape_problem, stored_tensors_problem
from qformat.spec.schemes import Scheme

__all__ = ["QFormatConfig", "QFormatHfQuantizer", "QFormatQuantizationConfig", "register", "saved_tensor_hashes"]

#: The name this class had before it also took quantization requests (kept so existing code keeps working).
QFormatQuantizationConfig = QFormatConfig

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


def _check_nothing_quantized_elsewhere(stored: dict[str, HeaderEntry], quantized: set[str], model: nn.Module,
                                       names: NameMap) -> None:
    """No quantized tensor belongs to a module of the model that is not a `QuantLinear` (it would be cast into a
    float parameter, or its scale ignored). Tensors of modules this model lacks are dropped by transformers."""
    model_modules = {name for name, _ in model.named_modules()}
    for name, entry in stored.items():
        module = name.rpartition(".")[0]
        if module in quantized or not _is_quantized(name, entry):
            continue
        target = names.module(module) if module else ""
        if target in model_modules:
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
            replace_module(model, name, linear)
    return model


def _tensor_hash(tensor: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def saved_tensor_hashes(model: nn.Module) -> dict[str, str]:
    """Content hashes of the tensors `save_pretrained` writes for `model`, by checkpoint name."""
    return {name: _tensor_hash(t.detach()) for name, t in saved_state_dict(model).items()}


class _QuantizeOnLoad(ConversionOps):
    """transformers' per-parameter quantize op: the weight of a planned module, as read from the checkpoint, becomes
    the tensors its `QuantLinear` stores (`qformat.quantize.stored.stored_tensors`)."""

    def __init__(self, quantizer: QFormatHfQuantizer) -> None:
        self.quantizer = quantizer

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model: nn.Module | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        (key, value), = input_dict.items()
        tensor = value[0] if isinstance(value, list) else value
        on_load = self.quantizer._on_load
        if on_load is None:
            raise RuntimeError("qformat's quantize op ran without a plan; report this bug")
        return on_load.quantize(key, tensor, model, missing_keys)


class QFormatHfQuantizer(HfQuantizer):
    """Loads qformat checkpoints into kernel-backed `QuantLinear` modules, and quantizes full-precision models while
    they load (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: QFormatConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_names: dict[str, str] = {}  # model module -> checkpoint module, for error messages
        self._on_load: OnLoadQuantization | None = None
        #: With `auto_fallback`, the model loads in float32 and is quantized after loading (the search needs the
        #: full-precision model); this is the dtype the user asked for, applied at the end.
        self._search_after: torch.dtype | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized:
            config.checkpoint  # noqa: B018 - raises a clear error for a config without checkpoint data
        elif config.recipe is None:
            raise OptionError("QFormatConfig(dequantize=True) loads a qformat checkpoint in full precision, and this "
                              "model is not one; pass QFormatConfig(scheme=...) to quantize it")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """`QFormatConfig(dtype=...)`, where given, is the dtype of the tensors kept in full precision."""
        recipe = None if self.pre_quantized else self.quantization_config.recipe
        if recipe is not None and recipe.dtype != AUTO_DTYPE:
            dtype = getattr(torch, recipe.dtype)
        if recipe is not None and recipe.calibrates:
            self._search_after = dtype
            return torch.float32  # the stored values, exactly: what the search measures and convert quantizes
        return dtype

    def update_attn_implementation(self, config):
        """transformers' last quantizer hook before it builds the model (recent versions; older ones never call
        it): refuse a config.json that asks for more layers than a local checkpoint's weights hold, before building
        100,000 layers takes minutes and gigabytes (the rule `qformat verify` applies)."""
        if self.pre_quantized:
            _check_layer_counts_before_building(config)
        parent = getattr(super(), "update_attn_implementation", None)
        return parent(config) if parent is not None else config

    # -- before the weights load ----------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        if not self.pre_quantized:
            recipe = self.quantization_config.recipe
            if recipe is not None and recipe.calibrates:
                return model  # loaded in full precision, quantized after loading
            self._on_load = OnLoadQuantization.prepare(model, recipe, checkpoint_files)
            return model
        spec = self.quantization_config.checkpoint
        stored = _stored_tensors(checkpoint_files)
        names = NameMap(model)
        if stored is None:  # no files to read (a state dict was passed): the model's names are the checkpoint's
            candidates = {n: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        else:
            candidates = {ckpt: names.module(ckpt) for ckpt in sorted(_quantized_modules(stored))}
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._checkpoint_names = {}
        threshold = self.quantization_config.run_outlier_threshold
        for ckpt_name, path in candidates.items():
            module = linears.get(path)
            resolved = spec.scheme_for(ckpt_name) if module is not None else None
            if resolved is None:
                continue  # kept in full precision, or not a Linear of this model: the check below refuses its data
            scheme_name, scheme = resolved
            if stored is not None and _CHECKS:
                _check_scheme_fits(stored, ckpt_name, scheme_name, scheme, module)
            replace_module(model, path, QuantLinear(module.in_features, module.out_features, scheme,
                                              bias=module.bias is not None, dtype=module.weight.dtype,
                                              device=module.weight.device, scheme_name=scheme_name,
                                              outlier_threshold=threshold))
            self._checkpoint_names[path] = ckpt_name
        if stored is not None and _CHECKS:
            _check_nothing_quantized_elsewhere(stored, set(self._checkpoint_names.values()), model, names)
        return model

    # -- while the weights load (quantizing on load only) ---------------------------------------------------------
    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return self._on_load is not None and param_name in self._on_load.pending

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    # -- after ----------------------------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if not self.pre_quantized and self.quantization_config.recipe is not None \
                and self.quantization_config.recipe.calibrates:
            from qformat.loaders.inplace import apply_recipe

            config = apply_recipe(model, self.quantization_config.recipe).config
            self._checkpoint_names = {}
            self.quantization_config = config
            model.config.quantization_config = config
            self.pre_quantized = True
            if self._search_after is not None and self._search_after != torch.float32:
                model.to(self._search_after)
            return model
        if self._on_load is not None:
            config = self._on_load.finish(model)
            self._checkpoint_names = self._on_load.checkpoint_names
            self._on_load = None
            self.quantization_config = config
            model.config.quantization_config = config
            self.pre_quantized = True  # the model now holds a qformat checkpoint's tensors: saved as one
        elif _CHECKS:
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
        self.quantization_config.set_tensor_hashes(saved_tensor_hashes(model))
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
