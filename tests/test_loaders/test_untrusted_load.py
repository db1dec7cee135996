"""`from_pretrained` on tampered checkpoints: every tensor that would make a silently wrong (or non-finite) model is
refused with one FormatError naming the module, instead of being loaded (issue 9).

Each case converts a tiny Llama, rewrites one tensor of the safetensors file (or drops / adds one) and loads it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qformat
from qformat.errors import FormatError
from qformat.quantize.observers import SCALE_PROBLEM

MODULE = "model.layers.0.mlp.up_proj"  # 64 -> 128: quantizable by every scheme, 2:4 included
Tamper = Callable[[dict[str, torch.Tensor]], None]


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    """scheme -> a converted tiny Llama, made on first use."""
    root = tmp_path_factory.mktemp("untrusted")

    @functools.cache
    def get(scheme: str) -> Path:
        return qformat.convert(tiny_models["llama"], root / scheme, scheme=scheme).output

    return get


def _tampered(source: Path, target: Path, tamper: Tamper) -> Path:
    """A copy of the checkpoint `source` whose tensors went through `tamper` (in place, on the loaded dict)."""
    shutil.copytree(source, target)
    file = target / "model.safetensors"
    tensors = load_file(file)
    tamper(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})
    return target


def _set(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tamper:
    def tamper(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = fn(tensors[name].clone())

    return tamper


def _at(index, value, *, view: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Write `value` at `index` (through a bit view of the tensor if `view` is given)."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        target = t.view(view) if view is not None else t
        target[index] = value
        return t

    return fn


def _drop(name: str) -> Tamper:
    return lambda tensors: tensors.pop(name)


def _add(name: str, like: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tamper:
    def tamper(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = fn(tensors[like].clone())

    return tamper


M = MODULE
CASES: dict[str, tuple[str, Tamper, str]] = {
    # 2:4 bitmasks that do not keep exactly two of every four (one byte holds two groups)
    "mask keeps 0": ("w8a8-int8+2:4", _set(f"{M}.bitmask", _at((3, 1), 0x00)), f"{M}.bitmask"),
    "mask keeps 1": ("w8a8-int8+2:4", _set(f"{M}.bitmask", _at((3, 1), 0x11)), f"{M}.bitmask"),
    "mask keeps 3": ("w8a8-int8+2:4", _set(f"{M}.bitmask", _at((0, 0), 0x77)), f"{M}.bitmask"),
    "mask keeps 8": ("w8a8-int8+2:4", _set(f"{M}.bitmask", _at((5, 2), 0xFF)), f"{M}.bitmask"),
    "fp8 mask keeps 3": ("fp8-dynamic+2:4", _set(f"{M}.bitmask", _at((0, 0), 0x77)), f"{M}.bitmask"),
    "fp8 mask keeps 0": ("fp8-weight-only+2:4", _set(f"{M}.bitmask", _at((1, 7), 0x00)), f"{M}.bitmask"),
    "2:4 shape disagrees": ("w8a16-int8+2:4", _set(f"{M}.shape", _at((1, 0), 32)), f"{M}.shape"),
    # dtypes the scheme does not allow (transformers would cast them into the parameter's dtype)
    "fp8 where int8": ("w8a8-int8", _set(f"{M}.weight", lambda t: t.float().mul(0.5).to(torch.float8_e4m3fn)),
                       f"{M}.weight"),
    "int8 where fp8": ("fp8-dynamic", _set(f"{M}.weight", lambda t: t.view(torch.int8)), f"{M}.weight"),
    "I32 scale": ("w8a16-int8", _set(f"{M}.weight_scale", lambda t: t.view(torch.int32)), f"{M}.weight_scale"),
    "F16 scale": ("fp8-dynamic", _set(f"{M}.weight_scale", lambda t: t.half()), f"{M}.weight_scale"),
    "scale shape [out]": ("w8a8-int8", _set(f"{M}.weight_scale", lambda t: t.reshape(-1)), f"{M}.weight_scale"),
    # scales that are not finite and positive
    "zero scale": ("w8a8-int8", _set(f"{M}.weight_scale", _at(7, 0.0)), f"{M}.weight_scale"),
    "negative scale": ("w8a16-int8", _set(f"{M}.weight_scale", _at(0, -0.01)), f"{M}.weight_scale"),
    "NaN scale": ("fp8-dynamic", _set(f"{M}.weight_scale", _at(9, float("nan"))), f"{M}.weight_scale"),
    "Inf scale": ("w8a8-int8+2:4", _set(f"{M}.weight_scale", _at(127, float("inf"))), f"{M}.weight_scale"),
    # finite scales so large that a stored value times the scale is Inf in fp32
    "huge int8 scale": ("w8a8-int8", _set(f"{M}.weight_scale", _at(3, 3e38)), f"{M}.weight_scale"),
    "huge fp8 scale": ("fp8-dynamic", _set(f"{M}.weight_scale", _at(3, 1e36)), f"{M}.weight_scale"),
    # fp8 NaN codes (e4m3fn 0x7F, 0xFF)
    "fp8 +NaN": ("fp8-dynamic", _set(f"{M}.weight", _at((4, 4), 0x7F, view=torch.uint8)), f"{M}.weight"),
    "fp8 -NaN": ("fp8-weight-only", _set(f"{M}.weight", _at((0, 63), 0xFF, view=torch.uint8)), f"{M}.weight"),
    "2:4 fp8 NaN": ("fp8-dynamic+2:4", _set(f"{M}.compressed", _at((2, 5), 0x7F, view=torch.uint8)),
                    f"{M}.compressed"),
    # quantized tensors that are missing
    "missing weight": ("w8a8-int8", _drop(f"{M}.weight"), f"{M}.weight"),
    "missing scale": ("fp8-weight-only", _drop(f"{M}.weight_scale"), M),
    "missing bitmask": ("w8a8-int8+2:4", _drop(f"{M}.bitmask"), f"{M}.bitmask"),
    # quantized tensors for a module the loader keeps in full precision
    "scale on a fallback module": ("w8a8-int8", _add("lm_head.weight_scale", f"{M}.weight_scale",
                                                     lambda t: t[:1].expand(256, 1)), "lm_head"),
    "int8 weight on a fallback module": ("w8a8-int8", _set("lm_head.weight", lambda t: t.to(torch.int8)),
                                         "lm_head.weight"),
    "scale on an embedding": ("w8a16-int8", _add("model.embed_tokens.weight_scale", f"{M}.weight_scale",
                                                 lambda t: t[:1].expand(256, 1)), "model.embed_tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_checkpoint_is_refused_naming_the_module(converted, tmp_path, case):
    scheme, tamper, named = CASES[case]
    folder = _tampered(converted(scheme), tmp_path / "tampered", tamper)
    with pytest.raises(FormatError, match=re.escape(named)) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("scheme", ["w8a8-int8", "fp8-dynamic+2:4", "w8a16-int8+2:4"])
def test_untampered_checkpoint_loads_with_finite_logits(converted, scheme):
    model = AutoModelForCausalLM.from_pretrained(converted(scheme))
    logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert bool(torch.isfinite(logits).all())



@pytest.mark.cuda
@pytest.mark.parametrize("case", ["mask keeps 3", "NaN scale", "fp8 -NaN", "missing weight"])
def test_tampered_checkpoint_is_refused_on_cuda(converted, tmp_path, case):
    scheme, tamper, named = CASES[case]
    folder = _tampered(converted(scheme), tmp_path / "tampered", tamper)
    with pytest.raises(FormatError, match=re.escape(named)):
        AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")


def test_bitmask_rule_matches_brute_force_for_every_byte():
    """`bitmask_problem` (the one bitmask rule, shared with verify) against a bit-by-bit count, for every byte value
    inside a row and as the last half byte of a row with in_features % 8 == 4."""
    from qformat.quantize.sparse24 import BITMASK_NOT_2_4, BITMASK_PADDING, bitmask_problem

    good = 0x33
    for byte in range(256):
        low, high = bin(byte & 15).count("1"), bin(byte >> 4).count("1")
        inside = torch.tensor([[good, byte, good]], dtype=torch.uint8)
        assert bitmask_problem(inside, 24) == (None if low == high == 2 else BITMASK_NOT_2_4), byte
        last = torch.tensor([[good, byte]], dtype=torch.uint8)
        want = BITMASK_NOT_2_4 if low != 2 else (BITMASK_PADDING if high else None)
        assert bitmask_problem(last, 12) == want, byte


def test_static_input_scale_is_checked_too():
    from qformat.nn import QuantLinear
    from qformat.spec import resolve_scheme_name

    scheme = resolve_scheme_name("w8a8-int8")[1]
    act = dataclasses.replace(scheme.input_activations, dynamic=False, strategy="tensor")
    static = dataclasses.replace(scheme, input_activations=act)
    assert static.has_static_input_scale
    module = QuantLinear.from_float(torch.nn.Linear(64, 32), static, input_scale=0.02)
    assert module.stored_value_problem() is None
    with torch.no_grad():
        module.input_scale.fill_(float("nan"))
    assert module.stored_value_problem() == ("input_scale", SCALE_PROBLEM)


def test_a_config_asking_for_more_layers_than_stored_is_refused_before_building(converted, tmp_path):
    """config.json with num_hidden_layers=100000 over a 2-layer checkpoint: from_pretrained refuses it before
    transformers builds the model (minutes and gigabytes otherwise), where transformers has the hook for it."""
    import json
    import threading

    import transformers

    if not hasattr(transformers.quantizers.base.HfQuantizer, "update_attn_implementation"):
        pytest.skip("this transformers has no quantizer hook between reading config.json and building the model")
    folder = _tampered(converted("w8a8-int8"), tmp_path / "tampered", lambda tensors: None)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 100_000
    (folder / "config.json").write_text(json.dumps(config))
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            transformers.AutoModelForCausalLM.from_pretrained(folder)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(60)
    assert outcome, "from_pretrained was still building the model after 60 s"
    assert isinstance(outcome[0], FormatError) and "num_hidden_layers=100000" in str(outcome[0]), outcome
