"""Quantizing in memory equals converting: `from_pretrained(..., quantization_config=QFormatConfig(...))` and
`qformat.quantize_` give, for every test architecture and scheme, exactly the tensors and fallback list
`qformat convert` writes; the result saves as a checkpoint `verify` accepts and reloads to identical logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import qformat
from qformat import QFormatConfig
from qformat.errors import OptionError, QFormatError
from qformat.nn import QuantLinear
from qformat.testing.judges import checkpoint_differences, checkpoint_tensors, model_class, quantization_block

SCHEMES = ["w8a16-int8", "w8a8-int8", "fp8-dynamic", "fp8-weight-only", "w8a8-int8+2:4"]
ARCHS = ["llama", "opt", "bart", "xlm-roberta", "llava", "gpt-neox", "qwen2", "gemma3"]


def _assert_same_checkpoint(ours: Path, converted: Path) -> None:
    """Tensor for tensor (names, dtypes, values) and rule for rule (schemes, overrides, fallback, fused groups)."""
    assert checkpoint_differences(ours, converted) == []
    qa, qb = quantization_block(ours), quantization_block(converted)
    for key in ("format_version", "schemes", "default_scheme", "overrides", "fallback", "fused_groups"):
        assert qa[key] == qb[key], key
    assert qa["statistics"]["modules"] == qb["statistics"]["modules"]


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 99, 3, 200, 31, 7, 64, 8]])
    return {"input_ids": ids, "decoder_input_ids": ids[:, :6]} if arch == "bart" else {"input_ids": ids}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizing_while_loading_equals_convert(tiny_models, converted, tmp_path, arch, scheme):
    source = tiny_models[arch]
    model = model_class(source).from_pretrained(source, quantization_config=QFormatConfig(scheme=scheme))
    count = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert count == quantization_block(converted(arch, scheme))["statistics"]["quantized_modules"] > 0
    model.save_pretrained(tmp_path / "saved")
    _assert_same_checkpoint(tmp_path / "saved", converted(arch, scheme))


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_in_place_equals_convert(tiny_models, converted, tmp_path, arch):
    source = tiny_models[arch]
    model = model_class(source).from_pretrained(source)
    result = qformat.quantize_(model, QFormatConfig(scheme="w8a8-int8"))
    expected = quantization_block(converted(arch, "w8a8-int8"))
    assert [e.to_dict() for e in result.fallback] == expected["fallback"]
    assert len(result.quantized) == expected["statistics"]["quantized_modules"]
    assert all(m.weight.is_floating_point() for m in model.modules() if type(m) is nn.Linear)
    model.save_pretrained(tmp_path / "saved")
    _assert_same_checkpoint(tmp_path / "saved", converted(arch, "w8a8-int8"))


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_saved_checkpoint_verifies_and_reloads_to_identical_logits(tiny_models, tmp_path, arch):
    source = tiny_models[arch]
    cls = model_class(source)
    model = cls.from_pretrained(source, quantization_config=QFormatConfig(scheme="w8a8-int8",
                                                                          overrides={"re:.*(fc2|down_proj)": "fp8-dynamic"}))
    model.save_pretrained(tmp_path / "saved")
    report = qformat.verify(tmp_path / "saved")  # raises on any problem
    assert report.hashes_checked == report.tensors and report.quantized_modules > 0
    reloaded = cls.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(model(**_inputs(arch)).logits, reloaded(**_inputs(arch)).logits)


def test_weights_are_quantized_from_stored_values_whatever_the_load_dtype(tiny_models, converted, tmp_path):
    source = tiny_models["llama"]
    model = model_class(source).from_pretrained(source, dtype=torch.bfloat16,
                                                 quantization_config=QFormatConfig(scheme="w8a16-int8"))
    assert model.model.norm.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "saved")
    ours, theirs = checkpoint_tensors(tmp_path / "saved"), checkpoint_tensors(converted("llama", "w8a16-int8"))
    quantized = [n for n in theirs if n.endswith((".weight_scale", ".weight")) and theirs[n].dtype in
                 (torch.int8, torch.float32) and n.rpartition(".")[0] + ".weight_scale" in theirs]
    assert quantized and all(torch.equal(ours[n], theirs[n]) for n in quantized)
    # the bfloat16 weights would have given other scales: the test can tell the difference
    from qformat.quantize.weights import quantize_weight
    from qformat.spec.schemes import resolve_scheme_name

    w = load_file(source / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    _, scheme = resolve_scheme_name("w8a16-int8")
    assert not torch.equal(quantize_weight(w.to(torch.bfloat16), scheme).scales,
                           theirs["model.layers.0.mlp.down_proj.weight_scale"])


def test_dtype_option_sets_the_full_precision_dtype(tiny_models, converted):
    source = tiny_models["llama"]
    model = model_class(source).from_pretrained(source, quantization_config=QFormatConfig(scheme="w8a8-int8",
                                                                                           dtype="bfloat16"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    in_place = model_class(source).from_pretrained(source)
    qformat.quantize_(in_place, scheme="w8a8-int8", dtype="bfloat16")
    assert in_place.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(in_place.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_rules_follow_the_converter(tiny_models, converted, tmp_path):
    """ignore, overrides and 'none' give the same fallback list through every path."""
    source = tiny_models["llama"]
    options = dict(scheme="fp8-dynamic", ignore=["re:.*layers\\.1\\.mlp.*"],
                   overrides={"re:.*o_proj": "w8a16-int8", "model.layers.0.self_attn.q_proj": "none"})
    out = qformat.convert(source, tmp_path / "conv", scheme=options["scheme"], ignore=options["ignore"],
                          overrides=list(options["overrides"].items())).output
    model = model_class(source).from_pretrained(source, quantization_config=QFormatConfig(**options))
    model.save_pretrained(tmp_path / "otf")
    _assert_same_checkpoint(tmp_path / "otf", out)
    fallback = {e["module"]: e["reason"] for e in quantization_block(out)["fallback"]}
    assert fallback["model.layers.0.self_attn.k_proj"] == "fused"  # q kept by the user: k and v follow


def test_unknown_scheme_fails_when_the_config_is_built():
    with pytest.raises(OptionError, match="unknown scheme 'int3'"):
        QFormatConfig(scheme="int3")
    with pytest.raises(OptionError, match="dtype"):
        QFormatConfig(dtype="int8")
    with pytest.raises(OptionError, match="sparsity"):
        QFormatConfig(sparsity="1:2")


def test_a_qformat_checkpoint_is_not_quantized_again(converted):
    folder = converted("llama", "w8a8-int8")
    with pytest.raises(OptionError, match=r"already quantized with qformat \(default scheme w8a8-int8.*"
                                          r"cannot be quantized again with scheme=fp8-dynamic"):
        model_class(folder).from_pretrained(folder, quantization_config=QFormatConfig(scheme="fp8-dynamic"))
    model = model_class(folder).from_pretrained(folder, quantization_config=QFormatConfig(dequantize=True))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    loaded = model_class(folder).from_pretrained(folder)
    with pytest.raises(OptionError, match="already quantized"):
        qformat.quantize_(loaded, scheme="w8a8-int8")


def test_dequantize_request_on_a_plain_model_is_refused(tiny_models):
    source = tiny_models["llama"]
    with pytest.raises(OptionError, match="not one; pass QFormatConfig\\(scheme=...\\)"):
        model_class(source).from_pretrained(source, quantization_config=QFormatConfig(dequantize=True))


def test_errors_are_qformat_errors_with_one_line(tiny_models):
    source = tiny_models["llama"]
    with pytest.raises(QFormatError) as info:
        model_class(source).from_pretrained(source, quantization_config=QFormatConfig(ignore=["model.nope"]))
    assert "\n" not in str(info.value) and "no Linear module" in str(info.value)


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["w8a16-int8", "w8a8-int8", "fp8-dynamic", "w8a8-int8+2:4"])
def test_quantizing_on_the_gpu_equals_convert(tiny_models, converted, tmp_path, scheme):
    """device_map="cuda": each weight is quantized on the GPU (no host round trip) to the converter's tensors."""
    source = tiny_models["llama"]
    model = model_class(source).from_pretrained(source, device_map="cuda", dtype=torch.bfloat16,
                                                 quantization_config=QFormatConfig(scheme=scheme))
    module = model.model.layers[0].mlp.down_proj
    assert isinstance(module, QuantLinear) and module.weight_scale.device.type == "cuda"
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3, 4]], device="cuda")).logits.isfinite().all()
    model.save_pretrained(tmp_path / "saved")
    ours, theirs = checkpoint_tensors(tmp_path / "saved"), checkpoint_tensors(converted("llama", scheme))
    quantized = {n for n in theirs if n.rpartition(".")[0] + ".weight_scale" in theirs and not n.endswith(".bias")}
    assert quantized and all(torch.equal(ours[n], theirs[n]) for n in quantized)


@pytest.mark.cuda
def test_quantize_in_place_on_the_gpu_equals_convert(tiny_models, converted, tmp_path):
    source = tiny_models["llama"]
    model = model_class(source).from_pretrained(source).to("cuda")
    qformat.quantize_(model, scheme="w8a8-int8")
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "cuda"
    model.save_pretrained(tmp_path / "saved")
    _assert_same_checkpoint(tmp_path / "saved", converted("llama", "w8a8-int8"))
