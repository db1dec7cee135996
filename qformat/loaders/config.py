"""`QFormatConfig`: quant_method "qformat" as transformers' `quantization_config`, in all three of its roles.

1. A quantization request, in the style of `BitsAndBytesConfig`, `TorchAoConfig` and `QuantoConfig`:
   `from_pretrained(source, quantization_config=QFormatConfig(scheme="w8a8-int8", ignore=[...],
   overrides={"re:.*down_proj": "fp8-dynamic"}, observer="mse", sparsity="2:4", dtype="bfloat16"))` quantizes a
   full-precision model while it loads, with `qformat convert`'s names, defaults and validation (they are one
   `qformat.plan.QuantRecipe`; a bad value is one `QFormatError` line here, when the config is built).
2. A qformat checkpoint's `quantization_config` block, as transformers reads it from config.json
   (`QFormatConfig.from_dict`): kept verbatim, so `save_pretrained` writes it back unchanged, and validated as
   `qformat.spec.CheckpointConfig` (an unknown format version fails here, with an upgrade hint).
3. Loading options for such a checkpoint: `QFormatConfig(dequantize=True)` gives plain `nn.Linear` layers;
   `QFormatConfig(outlier_threshold=6.0)` runs LLM.int8()'s decomposition on the int8 W8A8 modules of any
   checkpoint (0 turns a checkpoint's own threshold off). A load-time threshold changes what this process computes,
   not the checkpoint: `save_pretrained` writes the checkpoint's block as it was (convert with
   `--outlier-threshold` to record one).

One class serves all three because transformers pairs a checkpoint's config with the one passed to `from_pretrained`
by class: passing a request for a checkpoint that is already quantized reaches `requested` below, which refuses it
with a message saying how the checkpoint is quantized, instead of transformers' silent "the model's config wins".
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from qformat.errors import FormatError, OptionError
from qformat.plan.recipe import AUTO_DTYPE, QuantRecipe
from qformat.spec.config import QUANT_METHOD, CheckpointConfig

__all__ = ["QFormatConfig"]

#: Recipe fields that decide what is stored (dtype only changes the full-precision tensors' dtype on load).
_STORED_FIELDS = ("scheme", "ignore", "overrides", "observer", "sparsity")


class QFormatConfig(QuantizationConfigMixin):
    """How to quantize a model with qformat (see the module docstring for the three roles).

    Args:
        scheme: default scheme: "w8a16-int8", "w8a8-int8" (the default), "fp8-dynamic", "fp8-weight-only", each also
            with "+2:4".
        ignore: module names or "re:" patterns (checkpoint names, as in `qformat convert --ignore`) kept in full
            precision.
        overrides: {pattern: scheme} (or "PATTERN=SCHEME" strings); scheme "none" keeps matching modules.
        observer: "absmax" or "mse"; default "mse" for fp8 schemes, "absmax" for int8.
        sparsity: "2:4" to prune every quantized module to 2:4 structured sparsity.
        dtype: dtype of the tensors kept in full precision ("auto": the checkpoint's); overrides `from_pretrained`'s
            `dtype` when given.
        auto_fallback: True (budget 1 %) or a `qformat.search.FallbackBudget`: keep the most sensitive modules in
            full precision until the measured loss fits the budget. `from_pretrained` then loads the model in full
            precision first and quantizes it after the search (peak memory: the full-precision model).
        smoothquant: True (alpha 0.5) or a `qformat.smooth.SmoothQuant`: fold SmoothQuant factors from calibration
            text into the model before quantizing (loads in full precision first, like auto_fallback).
        outlier_threshold: LLM.int8()'s decomposition threshold for int8 W8A8 modules (bitsandbytes' default is
            6.0). Quantizing, it is recorded in the checkpoint; loading a qformat checkpoint, it replaces the
            checkpoint's own for this load (0: no decomposition).
        dequantize: for a qformat checkpoint only: load plain `nn.Linear` layers with the dequantized weights.
    """

    def __init__(self, scheme: str | None = None, ignore: Iterable[str] = (),
                 overrides: Mapping[str, str] | Iterable[Any] = (), observer: str | None = None,
                 sparsity: str | None = None, dtype: Any = AUTO_DTYPE, *, auto_fallback: Any = None,
                 smoothquant: Any = None, outlier_threshold: float | None = None, dequantize: bool = False) -> None:
        self.quant_method = QUANT_METHOD
        self.dequantize = bool(dequantize)
        self.outlier_threshold = _load_threshold(outlier_threshold)
        self._data: dict[str, Any] | None = None
        self._checkpoint: CheckpointConfig | None = None
        self._requested: QuantRecipe | None = None
        explicit = (scheme is not None or observer is not None or sparsity is not None or bool(ignore)
                    or bool(overrides) or auto_fallback not in (None, False) or smoothquant not in (None, False))
        if dequantize and (explicit or outlier_threshold is not None):
            raise OptionError("dequantize=True loads a qformat checkpoint in full precision; it takes no scheme, "
                              "ignore, overrides, observer, sparsity, auto_fallback, smoothquant or outlier_threshold")
        self.recipe: QuantRecipe | None = None if dequantize else QuantRecipe(
            scheme=scheme or "w8a8-int8", ignore=tuple(ignore), overrides=overrides, observer=observer,
            sparsity=sparsity, dtype=dtype, auto_fallback=auto_fallback, smoothquant=smoothquant,
            outlier_threshold=self.outlier_threshold or None)
        self._explicit = explicit
        from qformat.loaders.transformers import register  # a request is useless unless transformers knows qformat

        register()

    # -- role 2: a checkpoint's block -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """A checkpoint's `quantization_config` block (what transformers reads from config.json)."""
        config = cls.from_checkpoint(config_dict)
        unused = {}
        for key, value in kwargs.items():
            if key == "dequantize":
                config.dequantize = bool(value)
            elif key == "outlier_threshold":
                config.outlier_threshold = _load_threshold(value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_checkpoint(cls, data: Mapping[str, Any]) -> QFormatConfig:
        """Wrap a checkpoint's block, validated (`FormatError` naming the first problem)."""
        config = cls.__new__(cls)
        config.quant_method = QUANT_METHOD
        config.dequantize = bool(data.get("dequantize", False)) if isinstance(data, Mapping) else False
        config.outlier_threshold = None
        config.recipe = None
        config._explicit = False
        config._requested = None
        block = {k: v for k, v in dict(data).items() if k not in ("quant_method", "dequantize")}
        config._data = block
        config._checkpoint = CheckpointConfig.from_dict({"quant_method": QUANT_METHOD, **block})
        return config

    @property
    def is_checkpoint(self) -> bool:
        """Whether this describes a quantized checkpoint (role 2) rather than a request (roles 1 and 3)."""
        return self._data is not None

    @property
    def run_outlier_threshold(self) -> float | None:
        """The decomposition threshold this load runs: the load-time option where given (0: none), else the
        checkpoint's."""
        if self.outlier_threshold is not None:
            return self.outlier_threshold or None
        return self._checkpoint.outlier_threshold if self._checkpoint is not None else None

    @property
    def checkpoint(self) -> CheckpointConfig:
        """The checkpoint's parsed block; a `FormatError` for a request, which has none."""
        if self._checkpoint is None:
            raise FormatError("this QFormatConfig is a quantization request, not a checkpoint's config; "
                              "pass it to from_pretrained with a full-precision model")
        return self._checkpoint

    # -- a request meeting a checkpoint (transformers merges "loading attributes" into the checkpoint's config) ----
    def get_loading_attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {"dequantize": self.dequantize}
        if self.outlier_threshold is not None:
            attributes["outlier_threshold"] = self.outlier_threshold
        if self._explicit:
            attributes["requested"] = self.recipe
        return attributes

    @property
    def requested(self) -> QuantRecipe | None:
        return self._requested

    @requested.setter
    def requested(self, recipe: QuantRecipe | None) -> None:
        """Refuse a request for other quantization than the checkpoint's (transformers would silently keep the
        checkpoint's); a request equal to the recipe the checkpoint was made with is accepted."""
        if recipe is not None and self.is_checkpoint:
            recorded = (self._data or {}).get("provenance", {}).get("options") if self._data else None
            wanted = recipe.to_record()
            if not isinstance(recorded, dict) or any(recorded.get(k) != wanted[k] for k in _STORED_FIELDS):
                raise OptionError(
                    f"this model is already quantized with qformat ({self.describe()}); it cannot be quantized again "
                    f"with {self._request_text(recipe)}: load it without quantization_config, or quantize the "
                    "full-precision model instead")
        self._requested = recipe

    def describe(self) -> str:
        """How a checkpoint is quantized, in a few words ("default scheme w8a8-int8, 1 module kept")."""
        checkpoint = self.checkpoint
        kept = len(checkpoint.fallback)
        return f"default scheme {checkpoint.default_scheme}, {kept} module{'s' * (kept != 1)} kept in full precision"

    @staticmethod
    def _request_text(recipe: QuantRecipe) -> str:
        parts = [f"scheme={recipe.scheme}"]
        parts += [f"{k}={getattr(recipe, k)!r}" for k in ("ignore", "overrides", "observer", "sparsity")
                  if getattr(recipe, k) not in ((), None)]
        return ", ".join(parts)

    # -- serialization --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if self._data is not None:
            return {"quant_method": QUANT_METHOD, **copy.deepcopy(self._data)}
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "dequantize": self.dequantize}
        if self.recipe is not None:
            out.update(self.recipe.to_record())
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        if self._data is not None:
            return f"QFormatConfig(checkpoint: {self.describe()})"
        if self.recipe is None:
            return f"QFormatConfig(dequantize={self.dequantize})"
        return f"QFormatConfig({self._request_text(self.recipe)}, dtype={self.recipe.dtype!r})"

    def set_tensor_hashes(self, hashes: dict[str, str]) -> None:
        """Record the content hashes of the tensors a save writes (`provenance.tensor_hashes`)."""
        if self._data is None:
            raise FormatError("only a checkpoint's config records tensor hashes")
        provenance = dict(self._data.get("provenance") or {})
        provenance["tensor_hashes"] = dict(sorted(hashes.items()))
        self._data["provenance"] = provenance


def _load_threshold(value: Any) -> float | None:
    """A load-time `outlier_threshold`: None (the checkpoint's), 0 (none), or a positive finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise OptionError(f"outlier_threshold must be a positive number such as 6.0 (0: no decomposition), got "
                          f"{value!r}")
    return float(value)
