"""Loading checkpoints whose tensor names transformers renames on load: every quantized module becomes a QuantLinear
and the logits match a reference built without qformat's loader.

A tiny Llava stores the legacy layout (`language_model.model.*`, `language_model.lm_head`, `vision_tower.*`,
`multi_modal_projector.*`) while the model is built as `model.language_model.*`, `lm_head`, `model.vision_tower.*`;
a tiny GPT-NeoX stores its head as `embed_out`, built as `lm_head` (transformers 5.24). qformat names modules as the
checkpoint does, so its loader must map those names to the model's.

The reference is the checkpoint's dequantized weights (`qformat.checkpoint.dequantized_state_dict`, the format's
meaning of the stored tensors) saved as a plain folder and loaded by transformers alone, which applies its own
renaming; each reference Linear is matched to its checkpoint module by its (unique, random) weight values, and the
activations of modules whose scheme quantizes them are fake-quantized as the scheme says (docs/FORMAT.md
section 14).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import qformat
from qformat.checkpoint import open_checkpoint
from qformat.checkpoint.dequantize import dequantized_state_dict
from qformat.kernels import fake_quantize
from qformat.nn import QuantLinear
from qformat.spec import CheckpointConfig

QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn)
LLAVA_SCHEMES = ["w8a16-int8", "w8a8-int8", "fp8-dynamic", "fp8-weight-only", "w8a16-int8+2:4"]
NEOX_SCHEMES = ["w8a16-int8", "w8a8-int8", "fp8-dynamic"]
HEAD_OVERRIDE = ["embed_out=w8a16-int8"]  # the stored name of GPT-NeoX's head, quantized on request


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    """(arch, scheme, overrides) -> a converted checkpoint, made on first use."""
    root = tmp_path_factory.mktemp("renamed")

    @functools.cache
    def get(arch: str, scheme: str, overrides: tuple[str, ...] = ()) -> Path:
        out = root / f"{arch}-{scheme.replace(':', '')}-{len(overrides)}"
        return qformat.convert(tiny_models[arch], out, scheme=scheme, overrides=list(overrides)).output

    return get


def _qconfig(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    if arch == "llava":  # token 255 is the image token; 4 of them for 4 patches of a 32x32 image
        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return {"input_ids": torch.tensor([[1, 255, 255, 255, 255, 17, 42, 99, 3, 200]]), "pixel_values": pixels}
    return {"input_ids": torch.tensor([[5, 17, 42, 99, 3, 200, 31, 7, 64, 8]])}


def _logits(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(arch)).logits


def reference_model(cls, folder: Path, scratch: Path) -> nn.Module:
    """`folder`'s dequantized weights in a plain folder loaded by transformers alone, with activations fake-quantized
    per module as the checkpoint's schemes say."""
    state = dequantized_state_dict(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    scratch.mkdir()
    (scratch / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, scratch / "model.safetensors", metadata={"format": "pt"})
    model, info = cls.from_pretrained(scratch, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    spec = CheckpointConfig.from_dict(_qconfig(folder))
    quantized = {name: state[f"{name}.weight"] for name in open_checkpoint(folder).quantized_modules}
    matched = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        ckpt = next((n for n, w in quantized.items() if w.shape == module.weight.shape
                     and torch.equal(w, module.weight)), None)
        if ckpt is None:
            continue
        matched.add(ckpt)
        act = spec.scheme_for(ckpt)[1].input_activations
        if act is not None:
            def hook(_module, args, qtype=act.type):
                x = args[0]
                return (fake_quantize(x.reshape(-1, x.shape[-1]), qtype).reshape(x.shape),)

            module.register_forward_pre_hook(hook)
    assert matched == set(quantized), sorted(set(quantized) - matched)  # the oracle itself found every module
    return model.eval()


def check_loaded(cls, folder: Path, arch: str, scratch: Path) -> nn.Module:
    """Load `folder` with qformat's loader and check it against the config and the dequantized reference."""
    model = cls.from_pretrained(folder).eval()
    expected = _qconfig(folder)["statistics"]["quantized_modules"]
    quant = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quant) == expected, f"{len(quant)} QuantLinear for {expected} quantized modules"
    plain = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and m.weight.dtype in QUANTIZED_DTYPES]
    assert plain == [], f"plain nn.Linear holding quantized weights: {plain}"
    got, want = _logits(model, arch), _logits(reference_model(cls, folder, scratch), arch)
    # As in test_transformers: both sides compute in fp32 with identical quantized operands.
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    return model


@pytest.mark.parametrize("scheme", LLAVA_SCHEMES)
def test_llava_legacy_layout_loads_every_quantized_module(converted, tmp_path, scheme):
    folder = converted("llava", scheme)
    stored = set(open_checkpoint(folder).quantized_modules)
    assert "language_model.model.layers.0.self_attn.q_proj" in stored  # the legacy layout is what was converted
    assert "vision_tower.encoder.layers.1.mlp.fc2" in stored and "multi_modal_projector.linear_1" in stored
    model = check_loaded(AutoModelForImageTextToText, folder, "llava", tmp_path / "ref")
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, QuantLinear)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32  # the default fallback


@pytest.mark.parametrize("scheme", NEOX_SCHEMES)
def test_gpt_neox_quantized_embed_out_loads_and_runs(converted, tmp_path, scheme):
    folder = converted("gpt-neox", scheme, tuple(HEAD_OVERRIDE))
    assert "embed_out" in open_checkpoint(folder).quantized_modules
    model = check_loaded(AutoModelForCausalLM, folder, "gpt-neox", tmp_path / "ref")
    head = model.get_output_embeddings()
    assert isinstance(head, QuantLinear) and head.weight.dtype == torch.int8  # w8a16-int8, whatever the default


def test_gpt_neox_default_keeps_embed_out_in_full_precision(converted, tmp_path):
    folder = converted("gpt-neox", "w8a8-int8")
    assert {e["module"] for e in _qconfig(folder)["fallback"]} == {"embed_out"}
    model = check_loaded(AutoModelForCausalLM, folder, "gpt-neox", tmp_path / "ref")
    assert type(model.get_output_embeddings()) is nn.Linear


def test_quantized_tensors_of_a_renamed_module_the_config_keeps_are_refused(converted, tmp_path):
    """The loader's check that no stored quantized tensor lands outside a QuantLinear follows transformers' renaming:
    a Llava whose config keeps the language model's q/k/v (legacy names) while they are stored as int8 is refused,
    naming the tensor, instead of loading int8 values into plain Linear layers."""
    import shutil

    from qformat.errors import FormatError

    folder = shutil.copytree(converted("llava", "w8a8-int8"), tmp_path / "tampered")
    config = json.loads((folder / "config.json").read_text())
    prefix = "language_model.model.layers.0.self_attn"
    config["quantization_config"]["fallback"] += [
        {"module": f"{prefix}.{leaf}", "reason": "user", "detail": "", "measured": None}
        for leaf in ("q_proj", "k_proj", "v_proj")]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=rf"{prefix}\.[qkv]_proj\.weight(_scale)?: is quantized data .* in full "
                                          "precision"):
        AutoModelForImageTextToText.from_pretrained(folder)
