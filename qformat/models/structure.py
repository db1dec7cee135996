"""Which checkpoint tensors are Linear weights: decided from the model's structure, not from tensor names.

The architecture named in config.json is built on the meta device (no memory, no initialization cost), and every
checkpoint key is mapped to a model parameter the way transformers' loader maps it (its key renamings and
base-model-prefix handling). A key whose parameter belongs to a `torch.nn.Linear` is a Linear weight. The output
embedding (`get_output_embeddings()`) and whether it is tied to the input embedding come from the same model.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qformat.errors import FormatError, QFormatError, SourceError, UnsupportedModelError
from qformat.io.jsonfile import load_json
from qformat.models.names import NameMap, checkpoint_shapes
from qformat.spec.layout import FULL_PRECISION_DTYPES

__all__ = ["LAYER_COUNT_KEYS", "LAYER_COUNT_SLACK", "LinearModule", "ModelStructure", "analyze_structure",
           "check_layer_counts", "source_config", "structure_of"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearModule:
    """A `torch.nn.Linear` of the model, by both of its names.

    `name` is its tensor-name prefix in the checkpoint (key minus ".weight"), the name configs, patterns and fallback
    lists use; `module_path` is where it lives in the model (`model.get_submodule(module_path)`). They differ where
    transformers renames keys on load (`qformat.models.names`). A module the checkpoint lacks has its model name as
    both.
    """

    name: str
    out_features: int
    in_features: int
    weight_key: str | None
    bias_key: str | None
    output_embedding: bool = False
    tied: bool = False
    module_path: str = ""

    def __post_init__(self) -> None:
        if not self.module_path:
            object.__setattr__(self, "module_path", self.name)

    @property
    def in_checkpoint(self) -> bool:
        return self.weight_key is not None


@dataclass(frozen=True)
class ModelStructure:
    """What qformat needs to know about the model: its type, class and every Linear module in checkpoint order."""

    model_type: str
    architecture: str
    linears: dict[str, LinearModule]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings while building the meta model; qformat reports what matters itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _read_raw_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict, read with the untrusted-JSON limits."""
    raw = load_json(folder / "config.json", error=UnsupportedModelError)
    if not isinstance(raw, dict):
        raise UnsupportedModelError("config.json is not a JSON object; fix or re-download it")
    return raw


def _load_config(folder: Path, raw: dict[str, Any], *, quantized: bool = False):  # -> transformers.PretrainedConfig
    from transformers import AutoConfig

    if raw.get("quantization_config") and not quantized:
        method = raw["quantization_config"].get("quant_method", "unknown") if isinstance(raw["quantization_config"], dict) else "unknown"
        raise UnsupportedModelError(
            f"the source is already quantized (quant_method {method!r}); start from the full-precision model"
        )
    model_type = raw.get("model_type")
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        if quantized and hasattr(config, "quantization_config"):
            del config.quantization_config  # the structure is the unquantized model's; nothing here loads weights
        return config
    except (ValueError, KeyError, OSError) as exc:
        import transformers

        if raw.get("auto_map"):
            raise UnsupportedModelError(
                f"model_type {model_type!r} needs custom code from its repo (auto_map); qformat does not run remote code"
            ) from None
        if isinstance(model_type, str) and model_type in _known_model_types():
            raise UnsupportedModelError(
                f"transformers {transformers.__version__} refuses this config.json ({_first_line(exc)}); "
                "fix config.json"
            ) from None
        raise UnsupportedModelError(
            f"unknown architecture: transformers {transformers.__version__} does not know model_type {model_type!r} "
            f"({_first_line(exc)}); upgrade transformers or convert a supported model"
        ) from None
    except Exception as exc:  # config classes raise anything (TypeError, validators' errors) on values they refuse
        raise UnsupportedModelError(
            f"transformers refuses this config.json ({_first_line(exc)}); fix config.json"
        ) from None


def source_config(folder: Path):  # -> transformers.PretrainedConfig
    """The transformers config of the full-precision model in `folder`, read with the untrusted-JSON limits; refuses
    a quantized source and a model type that needs remote code (what `analyze_structure` refuses)."""
    return _load_config(Path(folder), _read_raw_config(Path(folder)))


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _first_line(exc: BaseException) -> str:
    """The message's first line; for a heading line ending in ':' (transformers' config validators), the reason
    that follows it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"[:240]
    return lines[0][:160]


#: config.json keys (at any nesting level, e.g. text_config) whose value is a number of numbered layers or experts,
#: i.e. of repeated modules the model builds: the work of building the model grows with them.
LAYER_COUNT_KEYS = frozenset({
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
    "num_encoder_layers", "num_decoder_layers", "num_local_experts", "n_routed_experts", "num_experts",
})
#: A layer count up to this is built even when the weights number fewer layers (ALBERT shares one layer group across
#: `num_hidden_layers`); building this many layers on the meta device takes about a second.
LAYER_COUNT_SLACK = 256


def _numbered_extent(names: Iterable[str]) -> int:
    """The number of layers tensor names hold: the largest integer path component + 1 (0 if none)."""
    numbers = (part for name in names for part in name.split(".") if part.isascii() and part.isdigit())
    return max((int(part) + 1 for part in numbers if len(part) < 10), default=0)


def _layer_counts(raw: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key path, value) of `raw` whose key is a layer count, at any nesting level."""
    stack = [(raw, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                at = f"{where}.{key}" if where else str(key)
                if key in LAYER_COUNT_KEYS:
                    yield at, value
                stack.append((value, at))
        elif isinstance(node, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))


def check_layer_counts(raw: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], error: type[QFormatError]) -> None:
    """Refuse, before building anything, a config that asks for more layers than the weights hold."""
    held = _numbered_extent(shapes)
    for where, value in _layer_counts(raw):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > max(held, LAYER_COUNT_SLACK):
            raise error(f"config.json says {where}={value} but the weights hold {held} layers; fix config.json or "
                        "re-download the model")


def _build_meta_model(config) -> torch.nn.Module:  # config: transformers.PretrainedConfig
    import transformers

    cls = None
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            break
    try:
        with _quiet_transformers(), torch.device("meta"):
            if cls is not None:
                return cls._from_config(config)
            return transformers.AutoModel.from_config(config)
    except Exception as exc:  # model constructors raise anything on configs they do not accept
        arch = (config.architectures or [config.model_type])[0]
        raise UnsupportedModelError(
            f"transformers cannot build {arch} from this config.json ({type(exc).__name__}: {_first_line(exc)}); "
            "check the config or upgrade transformers"
        ) from None


def _check_against_model(model: torch.nn.Module, modules: Mapping[str, torch.nn.Module],
                         shapes: Mapping[str, tuple[int, ...]], rename, error: type[QFormatError],
                         full_precision: Mapping[str, str]) -> None:
    """The weights must fit the model config.json builds: every stored parameter or buffer has the model's shape,
    a Linear module stores no tensor it does not have (a `.bias` where it has none), and the model numbers no more
    layers than the weights hold. transformers would otherwise fail to load the weights, or drop or re-initialize
    some of them without an error. (Other tensors of quantized layouts are checked by verify and the importer.)"""
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    # transformers' own (trusted) regexes of checkpoint keys a model drops on purpose, e.g. GPT-2's "attn.bias"
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    renamed_keys = []
    for key, shape in shapes.items():
        renamed, converted = rename(key)
        renamed_keys.append(renamed)
        module_name, _, suffix = renamed.rpartition(".")
        if converted:
            continue
        module = modules.get(module_name)
        if (isinstance(module, torch.nn.Linear) and suffix == "bias" and module.bias is None
                and not any(p.search(renamed) or p.search(key) for p in ignored)):
            raise error(f"{key}: {type(model).__name__} has no such tensor ({module_name} is a Linear without a "
                        "bias); transformers would drop it, so the model would differ from the checkpoint. Fix the "
                        "checkpoint or its config.json")
        want = expected.get(renamed)
        dtype = full_precision.get(key)
        if dtype is not None and renamed in parameters and dtype not in FULL_PRECISION_DTYPES:
            raise error(f"{key} is stored as {dtype}, but it is a full-precision parameter of {type(model).__name__} "
                        "(F16, BF16, F32 or F64); the checkpoint is damaged or was modified: re-download or re-convert it")
        if want is not None and tuple(shape) != want:
            raise error(f"{key} is {list(shape)} in the weights but config.json makes it {list(want)}; the config "
                        "and the weights disagree (fix config.json or re-download the model)")
    built = _numbered_extent(name for name, _ in model.named_parameters())
    held = _numbered_extent(renamed_keys)
    if built > held:
        raise error(f"config.json builds {built} numbered layers but the weights hold {held}; fix config.json or "
                    "re-download the model")


def _declared_ties(model: torch.nn.Module) -> set[str]:
    """Parameters transformers ties to another one (`all_tied_weights_keys` targets; transformers 5)."""
    try:
        return set(getattr(model, "all_tied_weights_keys", None) or ())
    except Exception:  # a property of an unusual model may raise: no declared ties
        return set()


def _refuse_fused_experts(model: torch.nn.Module, model_type: str) -> None:
    for name, param in model.named_parameters():
        if param.dim() >= 3 and ".experts" in f".{name}":
            raise UnsupportedModelError(
                f"{model_type} stores its MoE experts as fused 3-D tensors ({name}); qformat v1 quantizes "
                "nn.Linear modules only and does not convert fused-expert models yet"
            )


def analyze_structure(folder: Path, shapes: Mapping[str, tuple[int, ...]], *, quantized: bool = False,
                      full_precision: Mapping[str, str] | None = None) -> ModelStructure:
    """Build the model of `folder`'s config.json on meta and find every Linear module and its weight among the
    checkpoint tensors `shapes` (name -> shape, in checkpoint order). `full_precision` (name -> dtype code), where
    given, are the stored tensors that are not quantized data: each that loads into a model parameter must be a
    float (transformers would cast an I32 LayerNorm weight silently). `quantized=True` accepts a config that has a
    quantization_config (to check a converted checkpoint's structure)."""
    error = FormatError if quantized else SourceError
    raw = _read_raw_config(folder)
    check_layer_counts(raw, shapes, error)
    config = _load_config(folder, raw, quantized=quantized)
    model = _build_meta_model(config)
    return structure_of(model, shapes, error=error, full_precision=full_precision)


def structure_of(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]] | None = None, *,
                 error: type[QFormatError] = SourceError,
                 full_precision: Mapping[str, str] | None = None) -> ModelStructure:
    """The structure of `model` (on meta, or live on any device) with the checkpoint tensors `shapes`: every Linear
    module with its checkpoint and model names. `shapes=None` takes the model's own tensors as `save_pretrained`
    would name them (`qformat.models.names.checkpoint_shapes`). The same rules as for a folder apply."""
    if shapes is None:
        shapes = checkpoint_shapes(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    _refuse_fused_experts(model, model_type)
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    rename = NameMap(model).key
    _check_against_model(model, modules, shapes, rename, error, full_precision or {})

    # model module name -> (checkpoint module name, checkpoint key)
    found: dict[str, tuple[str, str]] = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        renamed, converted = rename(key)
        module_name = renamed[: -len(".weight")] if renamed.endswith(".weight") else None
        if module_name is None or not isinstance(modules.get(module_name), torch.nn.Linear):
            continue
        if converted:
            raise UnsupportedModelError(
                f"transformers merges or splits checkpoint tensor {key} on load; qformat v1 cannot quantize such "
                f"weights (model_type {model_type!r})"
            )
        found[module_name] = (key[: -len(".weight")], key)

    output = None
    tied = False
    with contextlib.suppress(Exception):
        output = model.get_output_embeddings()
        inputs = model.get_input_embeddings()
        tied = output is not None and inputs is not None and output.weight is inputs.weight
    output_name = next((n for n, m in modules.items() if m is output), None) if output is not None else None
    # before transformers loads weights (the quantizer's view), ties are declared but not yet made
    tied = tied or (output_name is not None and f"{output_name}.weight" in _declared_ties(model))

    linears: dict[str, LinearModule] = {}
    for model_name in linear_names:
        module = modules[model_name]
        ckpt = found.get(model_name)
        is_output = model_name == output_name
        if ckpt is None:
            name, weight_key, bias_key = model_name, None, None
            out_f, in_f = module.out_features, module.in_features
        else:
            name, weight_key = ckpt
            out_f, in_f = shapes[weight_key]
            bias_key = f"{name}.bias" if f"{name}.bias" in shapes else None
        linears[name] = LinearModule(name, out_f, in_f, weight_key, bias_key, is_output, is_output and tied,
                                     module_path=model_name)
    order = {key: i for i, key in enumerate(shapes)}
    ordered = sorted(linears.values(), key=lambda m: (m.weight_key is None, order.get(m.weight_key or "", 0)))
    architecture = type(model).__name__
    logger.info("%s (%s): %d Linear modules", architecture, model_type, len(ordered))
    return ModelStructure(model_type, architecture, {m.name: m for m in ordered})
