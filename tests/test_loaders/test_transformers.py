"""`from_pretrained` with quant_method "qformat": kernel-backed modules, outputs that match a dequantized reference
with the same activation quantization, generation, save/reload bit-exact, the dequantize option, the autoload hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

import qformat
from qformat.checkpoint import open_checkpoint
from qformat.errors import UnsupportedFormatVersionError
from qformat.kernels import fake_quantize
from qformat import QFormatConfig
from qformat.nn import QuantLinear
from qformat.spec import CheckpointConfig

AUTO = {"llama": AutoModelForCausalLM, "opt": AutoModelForCausalLM, "bart": AutoModelForSeq2SeqLM,
        "xlm-roberta": AutoModelForSequenceClassification}
SCHEMES = ["w8a16-int8", "w8a8-int8", "fp8-dynamic", "fp8-weight-only", "w8a8-int8+2:4", "w8a16-int8+2:4"]


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 99, 3, 200, 31, 7, 64, 8]])
    if arch == "bart":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids}


def _spec(folder: Path) -> CheckpointConfig:
    return CheckpointConfig.from_dict(json.loads((folder / "config.json").read_text())["quantization_config"])


def reference_model(cls, folder: Path, **kwargs) -> nn.Module:
    """The checkpoint's dequantized weights in plain nn.Linear layers, with each module's activations fake-quantized
    exactly as its scheme says (docs/FORMAT.md section 14)."""
    model = cls.from_pretrained(folder, quantization_config=QFormatConfig(dequantize=True), **kwargs)
    spec = _spec(folder)
    stored = set(open_checkpoint(folder).quantized_modules)
    prefix = model.base_model_prefix
    for name, module in model.named_modules():
        ckpt = next((c for c in (name, f"{prefix}.{name}") if c in stored), None)
        if not isinstance(module, nn.Linear) or ckpt is None:
            continue
        act = spec.scheme_for(ckpt)[1].input_activations
        if act is not None:
            qtype = act.type

            def hook(_module, args, qtype=qtype):
                x = args[0]
                return (fake_quantize(x.reshape(-1, x.shape[-1]), qtype).reshape(x.shape),)

            module.register_forward_pre_hook(hook)
    return model.eval()


def _logits(model, arch):
    with torch.no_grad():
        return model(**_inputs(arch)).logits


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", list(AUTO))
def test_outputs_match_the_dequantized_reference(converted, arch, scheme):
    folder = converted(arch, scheme)
    model = AUTO[arch].from_pretrained(folder).eval()
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == len(open_checkpoint(folder).quantized_modules) > 0
    for module in quantized:
        assert module.weight_scale.dtype == torch.float32
        stored = module.weight if module.scheme.sparsity is None else module.compressed
        assert stored.dtype == (torch.int8 if module.scheme.weights.type == "int" else torch.float8_e4m3fn)
    for name in (e.module for e in _spec(folder).fallback):
        module = model.get_submodule(name) if name in dict(model.named_modules()) else None
        assert module is None or type(module) is nn.Linear
    got, want = _logits(model, arch), _logits(reference_model(AUTO[arch], folder), arch)
    # Stated tolerance: 1e-4 of the largest logit. Both sides compute in fp32 with identical quantized operands;
    # what remains is summation order (int32 vs fp32 accumulation, tiled matmuls).
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("arch", ["llama", "opt", "bart"])
@pytest.mark.parametrize("scheme", ["w8a16-int8", "w8a8-int8", "fp8-dynamic"])
def test_generate_16_tokens(converted, arch, scheme):
    model = AUTO[arch].from_pretrained(converted(arch, scheme), dtype=torch.bfloat16).eval()
    ids = _inputs(arch)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    generated = out.shape[1] - (ids.shape[1] if arch != "bart" else 1)
    assert generated == 16


def test_base_model_class_maps_the_prefix(converted):
    folder = converted("llama", "w8a8-int8")
    base = AutoModel.from_pretrained(folder)  # LlamaModel: module names lack the "model." prefix
    assert sum(isinstance(m, QuantLinear) for m in base.modules()) == 14
    assert isinstance(base.layers[0].self_attn.q_proj, QuantLinear)


def test_dtype_device_map_and_to_keep_quantized_tensors(converted):
    folder = converted("llama", "w8a16-int8")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="auto")
    q = model.model.layers[0].mlp.up_proj
    assert isinstance(q, QuantLinear) and q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and q.bias is None
    model.to(torch.float32)
    assert q.weight.dtype == torch.int8 and model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs("llama")).logits).all()


@pytest.mark.parametrize("scheme", ["w8a8-int8", "fp8-weight-only+2:4"])
def test_save_pretrained_writes_the_same_tensors(converted, tmp_path, scheme):
    folder = converted("bart", scheme)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    model(**_inputs("bart"))  # kernels prepared and used: saving must not depend on that
    model.save_pretrained(tmp_path / "resaved")
    report = qformat.verify(tmp_path / "resaved")
    assert report.linear_modules == 17
    original = _spec(folder).provenance["tensor_hashes"]
    resaved = _spec(tmp_path / "resaved").provenance["tensor_hashes"]
    assert resaved == {k: v for k, v in original.items() if k in resaved}  # every saved tensor bit-exact
    assert {k for k in original if k not in resaved} <= {"model.encoder.embed_tokens.weight",
                                                          "model.decoder.embed_tokens.weight"}  # tied copies
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "resaved")
    assert torch.equal(_logits(again, "bart"), _logits(model, "bart"))


def test_resave_in_another_dtype_still_verifies(converted, tmp_path):
    folder = converted("llama", "w8a8-int8")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    qformat.verify(tmp_path / "bf16")
    hashes = _spec(tmp_path / "bf16").provenance["tensor_hashes"]
    original = _spec(folder).provenance["tensor_hashes"]
    assert hashes["model.layers.0.mlp.up_proj.weight"] == original["model.layers.0.mlp.up_proj.weight"]
    assert hashes["model.embed_tokens.weight"] != original["model.embed_tokens.weight"]  # now bf16


def test_dequantize_option_and_method(converted):
    folder = converted("opt", "w8a8-int8")
    plain = AutoModelForCausalLM.from_pretrained(folder, quantization_config=QFormatConfig(dequantize=True))
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    assert plain.model.decoder.layers[0].fc1.weight.dtype == torch.float32
    assert getattr(plain.config, "quantization_config", None) is None
    model = AutoModelForCausalLM.from_pretrained(folder)
    module = model.model.decoder.layers[0].fc1
    expected = module.dequantized_weight()
    model.dequantize()
    assert type(model.model.decoder.layers[0].fc1) is nn.Linear
    assert torch.equal(model.model.decoder.layers[0].fc1.weight, expected)
    assert torch.equal(plain.model.decoder.layers[0].fc1.weight, expected)


def test_unknown_format_version_is_refused_at_load(converted, tmp_path):
    import shutil

    folder = Path(shutil.copytree(converted("llama", "w8a8-int8"), tmp_path / "v2"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormatVersionError, match="format version 3"):
        AutoModelForCausalLM.from_pretrained(folder)


_AUTOLOAD_PROBE = """
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(type(model.model.layers[0].mlp.up_proj).__name__, model.model.layers[0].mlp.up_proj.weight.dtype,
      "qformat" in sys.modules)
"""


@pytest.mark.parametrize("disabled", [False, True], ids=["hook", "hook-disabled"])
def test_loading_without_import_qformat(converted, disabled):
    """The installed .pth hook registers qformat when transformers imports its quantizer registry. With the hook
    switched off, plain transformers silently builds nn.Linear layers (the garbage the hook exists to prevent)."""
    env = {k: v for k, v in os.environ.items() if k != "QFORMAT_NO_AUTOLOAD"}
    if disabled:
        env["QFORMAT_NO_AUTOLOAD"] = "1"
    result = subprocess.run([sys.executable, "-c", _AUTOLOAD_PROBE, str(converted("llama", "w8a8-int8"))],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    if disabled:
        assert result.stdout.split()[0] == "Linear"
    else:
        assert result.stdout.split() == ["QuantLinear", "torch.int8", "True"]


def test_masked_lm_class(tmp_path):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=256, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    folder = qformat.convert(tmp_path / "bert", tmp_path / "bert-w8a8", scheme="w8a8-int8").output
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 13  # 2 x 6 + the head's transform
    got, want = _logits(model, "bert"), _logits(reference_model(AutoModelForMaskedLM, folder), "bert")
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_loading_matches_the_reference(converted, scheme):
    from qformat.kernels import trace_paths

    folder = converted("llama", scheme)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
    assert all(m.weight_scale.is_cuda for m in model.modules() if isinstance(m, QuantLinear))
    inputs = {k: v.cuda() for k, v in _inputs("llama").items()}
    with torch.no_grad(), trace_paths() as log:
        got = model(**inputs).logits.float()
    assert not any(path.startswith("cpu") for _, path in log)
    reference = reference_model(AutoModelForCausalLM, folder, dtype=torch.bfloat16, device_map="cuda")
    with torch.no_grad():
        want = reference(**inputs).logits.float()
    assert (got - want).abs().max() <= 5e-2 * want.abs().max()  # bf16 kernels on both sides
    out = model.generate(inputs["input_ids"], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 16
