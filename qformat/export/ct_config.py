"""qformat schemes <-> compressed-tensors `quantization_config` (format-facts.md sections 1 and 3).

Only fields that compressed-tensors 0.17 (which vLLM 0.33 parses with) and 0.20 both accept are written:
`QuantizationArgs` and `QuantizationScheme` forbid unknown keys, so one extra key would break both vLLM and
transformers. qformat-specific data goes under the top-level `qformat` key, which `QuantizationConfig` ignores.
"""

from __future__ import annotations

from typing import Any

from qformat.errors import OptionError
from qformat.spec.schemes import QuantArgs, Scheme

__all__ = ["ct_args", "ct_format", "ct_quantization_config", "scheme_from_ct"]

CT_VERSION_NOTE = "written by qformat for compressed-tensors >= 0.17 / vLLM"


def ct_args(args: QuantArgs) -> dict[str, Any]:
    """A qformat QuantArgs as compressed-tensors `QuantizationArgs` fields (the six its serializer always writes)."""
    return {"num_bits": args.num_bits, "type": args.type, "symmetric": args.symmetric, "group_size": None,
            "strategy": args.strategy, "dynamic": args.dynamic}


def ct_format(scheme: Scheme) -> str:
    """The compressed-tensors format vLLM runs this (dense) scheme from (format-facts.md 1.2 and 3.1)."""
    if scheme.weights.type == "int":
        return "int-quantized" if scheme.input_activations is not None else "pack-quantized"
    return "float-quantized" if scheme.input_activations is not None else "naive-quantized"


def ct_quantization_config(groups: list[tuple[Scheme, list[str]]], ignore: list[str],
                           qformat_note: dict[str, Any]) -> dict[str, Any]:
    """The `quantization_config` block: one config group per scheme with explicit module-name targets.

    Explicit names (never class names) make the matching unambiguous for compressed-tensors and vLLM alike; `ignore`
    lists the modules kept in full precision by name, as vLLM requires.
    """
    config_groups = {}
    formats = []
    for i, (scheme, modules) in enumerate(groups):
        fmt = ct_format(scheme)
        formats.append(fmt)
        config_groups[f"group_{i}"] = {
            "targets": sorted(modules),
            "weights": ct_args(scheme.weights),
            "input_activations": None if scheme.input_activations is None else ct_args(scheme.input_activations),
            "output_activations": None,
            "format": fmt,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(set(formats)) == 1 else "mixed-precision",
        "config_groups": config_groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "qformat": qformat_note,
    }


def _qformat_args(args: Any, what: str, where: str) -> QuantArgs:
    """compressed-tensors `QuantizationArgs` (pydantic) -> qformat QuantArgs, refusing what v1 cannot represent."""
    type_ = str(getattr(args.type, "value", args.type))
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if args.num_bits != 8:
        raise OptionError(f"{where}: {what} are {args.num_bits}-bit; qformat v1 stores 8-bit values only")
    if not args.symmetric:
        raise OptionError(f"{where}: {what} are asymmetric (zero points); qformat v1 is symmetric only")
    if strategy in ("group", "block", "tensor_group", "attn_head"):
        size = f" (group_size {args.group_size})" if getattr(args, "group_size", None) else ""
        raise OptionError(f"{where}: {what} use {strategy}-wise scales{size}; qformat v1 and its kernels take "
                          "per-channel weight scales and per-token or per-tensor activation scales only, so this "
                          "checkpoint cannot be imported (quantize the original model with `qformat convert`)")
    dynamic = args.dynamic is True
    if what == "weights":
        if dynamic:
            raise OptionError(f"{where}: dynamic weight scales are not representable")
        # a per-tensor weight scale is the same as that scale repeated for every channel
        return QuantArgs(type=type_, strategy="channel")
    if dynamic and strategy != "token":
        raise OptionError(f"{where}: dynamic {strategy}-wise activation scales are not representable; qformat has "
                          "dynamic per-token or static per-tensor activation scales")
    return QuantArgs(type=type_, strategy=strategy, dynamic=dynamic)


def scheme_from_ct(ct_scheme: Any, where: str) -> Scheme:
    """The qformat scheme that stores what a compressed-tensors `QuantizationScheme` describes (dense)."""
    if ct_scheme.weights is None:
        raise OptionError(f"{where}: activation-only quantization is not representable in qformat v1")
    if ct_scheme.output_activations is not None:
        raise OptionError(f"{where}: output activation quantization is not representable in qformat v1")
    weights = _qformat_args(ct_scheme.weights, "weights", where)
    act = ct_scheme.input_activations
    acts = None if act is None else _qformat_args(act, "input activations", where)
    if acts is not None and acts.type != weights.type:
        raise OptionError(f"{where}: {weights.type} weights with {acts.type} activations are not representable")
    return Scheme(weights=weights, input_activations=acts)
