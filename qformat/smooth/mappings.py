"""Where SmoothQuant's factors can be folded exactly, per architecture, as data.

A fold divides the output channels of a *source* (a norm, or a Linear) by s and multiplies the matching input
columns of the *targets* (the Linear modules that read that output, and nothing else) by s. It is exact only where the
source's output reaches nothing but the targets, through operations that commute with a positive per-channel scale:

- a pre-norm block's norm (RMSNorm `x * w`, LayerNorm `x * w + b`): its output is read by the attention's q/k/v or
  the MLP's first Linear(s) only, while the residual stream takes the norm's *input*;
- `up_proj -> down_proj` in a gated MLP: `down(act(gate(x)) * up(x))` is linear in up's output channel by channel;
- `v_proj -> o_proj`: attention mixes tokens, never channels, of V (with grouped-query attention one V channel feeds
  one o_proj input channel per query head of its group, so those must share one factor);
- `fc1 -> fc2` where the activation between them is ReLU (`relu(x / s) = relu(x) / s` for s > 0).

Everything else is skipped with a reason, recorded in the checkpoint: a post-norm block's norm output is also the
residual (scaling it would change the residual stream); GELU/SiLU are not positively homogeneous; Gemma's RMSNorm
multiplies by `1 + w`, and `(1 + w) / s - 1` stored in bfloat16 loses up to s times the norm's relative precision
(0.4 % becomes several percent per channel for the factors activation outliers need), so it is not folded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["FAMILIES", "Family", "Place", "ResolvedPlace", "Skipped", "family_of", "resolve_places",
           "NORM_KINDS"]

#: How a source's output channels are divided: RMSNorm weight; LayerNorm weight and bias; a Linear's rows (and bias).
NORM_KINDS = ("rms_norm", "layer_norm")
_KINDS = (*NORM_KINDS, "linear")

POST_LN = "post-LN block: the norm output is also the residual"
GEMMA_NORM = ("Gemma's RMSNorm multiplies by (1 + w); (1 + w)/s - 1 stored in bfloat16 loses up to s times the "
              "norm's precision, so it is not folded")


@dataclass(frozen=True)
class Place:
    """One fold inside a repeated block, by paths relative to the block. `heads`: the source is an attention's
    v_proj and the target its o_proj (factors shared across the query heads of a kv head). `skip`: why this place is
    not folded in this family (None: it is exact)."""

    source: str
    kind: str
    targets: tuple[str, ...]
    heads: bool = False
    skip: str | None = None

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, self.kind


@dataclass(frozen=True)
class Family:
    """An architecture family: the model types it covers and, per kind of repeated block (a regex of its module
    path), the places of that block. The exactness of an MLP activation place is decided from the config
    (`resolve_places`)."""

    name: str
    model_types: tuple[str, ...]
    blocks: tuple[tuple[str, tuple[Place, ...]], ...]


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYERS = r"(?:^|\.)layers\.\d+$"
_DECODER = r"(?:^|\.)decoder\.layers\.\d+$"
_ENCODER = r"(?:^|\.)encoder\.layers\.\d+$"
_GATED_MLP = Place("mlp.up_proj", "linear", ("mlp.down_proj",))
_V_O = Place("self_attn.v_proj", "linear", ("self_attn.o_proj",), heads=True)
_V_OUT = Place("self_attn.v_proj", "linear", ("self_attn.out_proj",), heads=True)
_FC = Place("fc1", "linear", ("fc2",))
#: A post-LN block's attention reads the block's input: the previous block's norm output, also its residual.
_POST_LN_INPUT = Place("", "layer_norm", _QKV, skip=POST_LN)


def _gemma(mlp_norm: str) -> tuple[Place, ...]:
    return (Place("input_layernorm", "rms_norm", _QKV, skip=GEMMA_NORM), _V_O,
            Place(mlp_norm, "rms_norm", ("mlp.gate_proj", "mlp.up_proj"), skip=GEMMA_NORM), _GATED_MLP)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), ((_LAYERS, (
        Place("input_layernorm", "rms_norm", _QKV), _V_O,
        Place("post_attention_layernorm", "rms_norm", ("mlp.gate_proj", "mlp.up_proj")), _GATED_MLP)),)),
    Family("gemma", ("gemma",), ((_LAYERS, _gemma("post_attention_layernorm")),)),
    Family("gemma2", ("gemma2", "gemma3_text"), ((_LAYERS, _gemma("pre_feedforward_layernorm")),)),
    Family("opt", ("opt",), ((_DECODER, (
        Place("self_attn_layer_norm", "layer_norm", _QKV), _V_OUT,
        Place("final_layer_norm", "layer_norm", ("fc1",)), _FC)),)),
    Family("opt-post-ln", (), ((_DECODER, (
        _POST_LN_INPUT, _V_OUT, Place("self_attn_layer_norm", "layer_norm", ("fc1",), skip=POST_LN), _FC)),)),
    Family("bart", ("bart",), (
        (_ENCODER, (_POST_LN_INPUT, _V_OUT, Place("self_attn_layer_norm", "layer_norm", ("fc1",), skip=POST_LN),
                    _FC)),
        (_DECODER, (_POST_LN_INPUT, _V_OUT,
                    Place("self_attn_layer_norm", "layer_norm", ("encoder_attn.q_proj",), skip=POST_LN),
                    Place("encoder_attn.v_proj", "linear", ("encoder_attn.out_proj",), heads=True),
                    Place("encoder_attn_layer_norm", "layer_norm", ("fc1",), skip=POST_LN), _FC)))),
)

#: MLP places whose exactness depends on the activation between source and target (config key per family).
_ACTIVATION_PLACES = frozenset({"fc1"})


def family_of(config: Any) -> Family | None:
    """The family of a transformers config (or config.json dict), or None where qformat knows no exact fold."""
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    model_type = get("model_type")
    if model_type == "opt" and get("do_layer_norm_before", True) is False:
        return next(f for f in FAMILIES if f.name == "opt-post-ln")
    return next((f for f in FAMILIES if model_type in f.model_types), None)


@dataclass(frozen=True)
class ResolvedPlace:
    """A place in one block of a live model: module paths, and the head layout of a v -> o fold."""

    source: str
    kind: str
    targets: tuple[str, ...]
    heads: int = 0  # grouped-query attention: query heads (o_proj's input = heads x head_dim); 0 = one to one


@dataclass(frozen=True)
class Skipped:
    """A source (or None) and the Linear modules (model paths) whose input is not smoothed, and why."""

    source: str | None
    targets: tuple[str, ...]
    reason: str


def _activation(config: Any) -> str:
    return str(getattr(config, "activation_function", None) or getattr(config, "hidden_act", None) or "unknown")


def _place_skip(family: Family, place: Place, config: Any) -> str | None:
    if place.skip is not None:
        return place.skip
    if place.source in _ACTIVATION_PLACES:
        act = _activation(config)
        if act != "relu":
            return f"activation between {place.source} and {place.targets[0]} is {act}, not positively homogeneous"
    return None


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return getattr(config, "get_text_config", lambda: config)() or config


def resolve_places(model: nn.Module) -> tuple[list[ResolvedPlace], list[Skipped]]:
    """Every exact fold of `model` and every Linear (by model path) whose input is left alone, with the reason.
    A place applies to a block only where all its modules exist with the expected types."""
    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    config = _text_config(model)
    family = family_of(model.config)  # a composite model (Llava) is not a text family, even if its LM is
    if family is None:
        model_type = getattr(model.config, "model_type", None) or type(model).__name__
        return [], [Skipped(None, tuple(linears), f"no exact fold known for {model_type}")]
    places: list[ResolvedPlace] = []
    skipped: list[Skipped] = []
    covered: set[str] = set()
    for regex, block_places in family.blocks:
        pattern = re.compile(regex)
        for block in (name for name in modules if pattern.search(name)):
            for place in block_places:
                _resolve(block, place, family, modules, config, places, skipped, covered)
    rest = tuple(name for name in linears if name not in covered)
    if rest:
        skipped.append(Skipped(None, rest, f"no exact fold known for this input in {family.name} blocks"))
    return places, skipped


def _resolve(block: str, place: Place, family: Family, modules: dict[str, nn.Module], config: Any,
             places: list[ResolvedPlace], skipped: list[Skipped], covered: set[str]) -> None:
    """Add `place` of `block` to `places` (exact here) or `skipped` (with its reason), if the block has it."""
    source = f"{block}.{place.source}" if place.source else None
    targets = tuple(f"{block}.{t}" for t in place.targets)
    if (source is not None and source not in modules) or not all(isinstance(modules.get(t), nn.Linear)
                                                                 for t in targets):
        return
    covered.update(targets)
    reason = _place_skip(family, place, config)
    heads = 0
    if reason is None and place.heads and modules[source or ""].out_features != modules[targets[0]].in_features:
        heads = int(getattr(config, "num_attention_heads", 0) or 0)  # grouped-query attention
        reason = _heads_problem(modules[source or ""], modules[targets[0]], heads)
    if reason is None and place.kind != "linear" and not _norm_fits(modules[source or ""], place.kind,
                                                                     modules[targets[0]].in_features):
        reason = f"{type(modules[source or '']).__name__} is not the {place.kind.replace('_', ' ')} this fold expects"
    if reason is None and source is not None:
        places.append(ResolvedPlace(source, place.kind, targets, heads))
    else:
        skipped.append(Skipped(source, targets, reason or "no exact fold"))


def _norm_fits(module: nn.Module, kind: str, channels: int) -> bool:
    weight = getattr(module, "weight", None)
    if weight is None or tuple(weight.shape) != (channels,):
        return False
    bias = getattr(module, "bias", None)
    return (bias is not None and tuple(bias.shape) == (channels,)) if kind == "layer_norm" else bias is None


def _heads_problem(v: nn.Module, o: nn.Module, heads: int) -> str | None:
    """Why a v -> o fold's head layout is not understood, or None: o's input must be `heads` x head_dim and v's
    output a whole number of kv heads of that head_dim, dividing the query heads evenly."""
    if not isinstance(v, nn.Linear) or heads <= 0 or o.in_features % heads:
        return "attention head layout not understood"
    head_dim = o.in_features // heads
    if v.out_features % head_dim or heads % (v.out_features // head_dim):
        return "attention head layout not understood"
    return None
