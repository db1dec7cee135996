"""Every test architecture x every scheme, through the Python API: verify accepts it, the dequantized weights are
within the spec's bound of the source, and the fallback list is exactly the hand-written expectation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import qformat
from qformat.spec import CheckpointConfig, quantized_nbytes
from qformat.testing import spec_error_bound
from qformat.testing.judges import checkpoint_tensors, quantization_block

SCHEMES = ["w8a16-int8", "w8a8-int8", "fp8-dynamic", "fp8-weight-only"]
ARCHS = ["llama", "opt", "bart", "xlm-roberta", "llava", "gpt-neox", "qwen2", "gemma3"]

#: Hand-written: (module, reason) kept in full precision by default, per architecture.
DEFAULT_FALLBACK = {
    "llama": {("lm_head", "default")},  # untied output embedding: kept by default
    "opt": {("lm_head", "default")},  # tied to the input embeddings: never quantized
    "bart": {("lm_head", "default")},  # tied to model.shared
    "xlm-roberta": {("classifier.out_proj", "shape")},  # 3 labels: out_features=3 is no multiple of 16
    # Names are the checkpoint's: Llava stores its head as language_model.lm_head (built as lm_head) ...
    "llava": {("language_model.lm_head", "default")},
    "gpt-neox": {("embed_out", "default")},  # ... and GPT-NeoX as embed_out (built as lm_head)
    "qwen2": {("lm_head", "default")},  # tied to model.embed_tokens
    "gemma3": {("lm_head", "default")},  # tied to model.embed_tokens
}
#: Llava: CLIP 2 x (q, k, v, out_proj, fc1, fc2) + projector linear_1, linear_2 + Llama 2 x 7 + head = 29.
#: GPT-NeoX: 2 x (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) + embed_out = 9.
LINEAR_COUNT = {"llama": 15, "opt": 15, "bart": 17, "xlm-roberta": 14, "llava": 29, "gpt-neox": 9, "qwen2": 15,
                "gemma3": 15}


def check_within_bound(source: Path, output: Path) -> int:
    """Independently decode every quantized module of `output` and compare with `source`; return how many."""
    src, out = checkpoint_tensors(source), checkpoint_tensors(output)
    qc = CheckpointConfig.from_dict(quantization_block(output))
    checked = 0
    for name in [k[: -len(".weight_scale")] for k in out if k.endswith(".weight_scale")]:
        scheme_name, scheme = qc.scheme_for(name)
        w = src[f"{name}.weight"].double()
        scale = out[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], 1)
        if scheme.sparsity:
            n, k = out[f"{name}.shape"].reshape(-1).tolist()
            assert (n, k) == tuple(w.shape)
            mask = np.unpackbits(out[f"{name}.bitmask"].numpy(), axis=-1, bitorder="little", count=k).astype(bool)
            mask = torch.from_numpy(mask)
            kept = out[f"{name}.compressed"].double()
            w_hat = torch.zeros_like(w)
            w_hat[mask] = kept.reshape(-1) * scale.double().expand(-1, k // 2).reshape(-1)
            w = torch.where(mask, w, torch.zeros_like(w))  # the bound is for kept values; the rest must be 0
            assert bool((w_hat[~mask] == 0).all())
        else:
            assert f"{name}.weight" in out and out[f"{name}.weight"].shape == w.shape
            w_hat = out[f"{name}.weight"].double() * scale.double()
        excess = ((w - w_hat).abs() - spec_error_bound(w, scale, scheme.weights.type)).max()
        assert excess <= 0, f"{name} ({scheme_name}) exceeds the bound by {excess}"
        checked += 1
    # everything else is bit-identical to the source
    quantized = {k[: -len(".weight_scale")] for k in out if k.endswith(".weight_scale")}
    for key, tensor in src.items():
        if key.endswith(".weight") and key[: -len(".weight")] in quantized:
            continue
        assert torch.equal(out[key].view(torch.uint8), tensor.view(torch.uint8)), key
    return checked


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_scheme_matrix(tiny_models, tmp_path, arch, scheme):
    out = tmp_path / "out"
    result = qformat.convert(tiny_models[arch], out, scheme=scheme)
    report = qformat.verify(out)
    assert report.hashes_checked == report.tensors > 0
    assert report.linear_modules == LINEAR_COUNT[arch]
    fallback = {(e["module"], e["reason"]) for e in quantization_block(out)["fallback"]}
    assert fallback == DEFAULT_FALLBACK[arch]
    assert result.linear_modules == LINEAR_COUNT[arch]
    assert result.quantized_modules == LINEAR_COUNT[arch] - len(fallback)
    assert check_within_bound(tiny_models[arch], out) == result.quantized_modules


@pytest.mark.parametrize("arch", ARCHS)
def test_2_4_matrix_and_stored_bytes(tiny_models, tmp_path, arch):
    out = tmp_path / "out"
    result = qformat.convert(tiny_models[arch], out, scheme="w8a8-int8", sparsity="2:4")
    qformat.verify(out)
    assert {(e["module"], e["reason"]) for e in quantization_block(out)["fallback"]} == DEFAULT_FALLBACK[arch]
    assert check_within_bound(tiny_models[arch], out) == result.quantized_modules
    from qformat.checkpoint import open_checkpoint

    ckpt = open_checkpoint(out)
    qc = ckpt.qconfig
    for module in ckpt.quantized_modules:
        n, k = ckpt.load(f"{module}.shape").reshape(-1).tolist()
        stored = sum(e.nbytes for name, (_, e) in ckpt.tensors.items() if name.rsplit(".", 1)[0] == module
                     and name.rsplit(".", 1)[1] in ("compressed", "bitmask", "shape", "weight_scale"))
        assert stored == n * k // 2 + n * -(-k // 8) + 16 + 4 * n == quantized_nbytes(qc.scheme_for(module)[1], n, k)


def test_2_4_mask_equals_an_independent_selection(tiny_llama_bf16, tmp_path):
    out = tmp_path / "out"
    qformat.convert(tiny_llama_bf16, out, scheme="fp8-weight-only+2:4", observer="absmax")
    src, dst = checkpoint_tensors(tiny_llama_bf16), checkpoint_tensors(out)
    name = "model.layers.1.mlp.down_proj"
    w = src[f"{name}.weight"].float()
    groups = w.abs().reshape(w.shape[0], -1, 4)
    order = torch.argsort(-groups, dim=-1, stable=True)  # stable: ties keep index order
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True).reshape(w.shape)
    mask = np.unpackbits(dst[f"{name}.bitmask"].numpy(), axis=-1, bitorder="little").astype(bool)
    assert torch.equal(torch.from_numpy(mask), expected)
    # the kept values are those of the source, quantized with scales computed from them
    kept = w[expected].reshape(w.shape[0], -1)
    scale = dst[f"{name}.weight_scale"]
    assert torch.equal(scale.reshape(-1), (kept.abs().amax(dim=1) / 448).reshape(-1))
    expected_values = (kept / scale).to(torch.float8_e4m3fn)
    assert torch.equal(dst[f"{name}.compressed"].view(torch.uint8), expected_values.view(torch.uint8))


EXPECTED_WITH_OPTIONS = {
    "llama": (dict(ignore=["re:.*down_proj", "model.layers.1.self_attn.k_proj"]), {
        ("lm_head", "default"), ("model.layers.0.mlp.down_proj", "user"), ("model.layers.1.mlp.down_proj", "user"),
        ("model.layers.1.self_attn.k_proj", "user"), ("model.layers.1.self_attn.q_proj", "fused"),
        ("model.layers.1.self_attn.v_proj", "fused")}),
    "opt": (dict(overrides=["re:.*fc1=none"]), {
        ("lm_head", "default"), ("model.decoder.layers.0.fc1", "user"), ("model.decoder.layers.1.fc1", "user")}),
    "bart": (dict(ignore=["model.decoder.layers.0.encoder_attn.q_proj"]), {
        ("lm_head", "default"), ("model.decoder.layers.0.encoder_attn.q_proj", "user"),
        ("model.decoder.layers.0.encoder_attn.k_proj", "fused"),
        ("model.decoder.layers.0.encoder_attn.v_proj", "fused")}),
    "xlm-roberta": (dict(ignore=["re:.*layer\\.0\\.attention\\.self\\.query"]), {
        ("classifier.out_proj", "shape"), ("roberta.encoder.layer.0.attention.self.query", "user"),
        ("roberta.encoder.layer.0.attention.self.key", "fused"),
        ("roberta.encoder.layer.0.attention.self.value", "fused")}),
    # Patterns match checkpoint names, which transformers renames on load for Llava and GPT-NeoX.
    "llava": (dict(ignore=["language_model.model.layers.1.self_attn.q_proj", "re:vision_tower\\..*\\.fc2"]), {
        ("language_model.lm_head", "default"), ("language_model.model.layers.1.self_attn.q_proj", "user"),
        ("language_model.model.layers.1.self_attn.k_proj", "fused"),
        ("language_model.model.layers.1.self_attn.v_proj", "fused"),
        ("vision_tower.encoder.layers.0.mlp.fc2", "user"), ("vision_tower.encoder.layers.1.mlp.fc2", "user")}),
    "gpt-neox": (dict(overrides=["embed_out=w8a16-int8", "re:.*dense_4h_to_h=none"]), {
        ("gpt_neox.layers.0.mlp.dense_4h_to_h", "user"), ("gpt_neox.layers.1.mlp.dense_4h_to_h", "user")}),
    "qwen2": (dict(ignore=["model.layers.0.mlp.up_proj"]), {
        ("lm_head", "default"), ("model.layers.0.mlp.up_proj", "user"), ("model.layers.0.mlp.gate_proj", "fused")}),
    "gemma3": (dict(overrides=["re:.*down_proj=fp8-dynamic", "model.layers.1.self_attn.o_proj=none"]), {
        ("lm_head", "default"), ("model.layers.1.self_attn.o_proj", "user")}),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_fallback_list_with_options(tiny_models, tmp_path, arch):
    options, expected = EXPECTED_WITH_OPTIONS[arch]
    out = tmp_path / "out"
    qformat.convert(tiny_models[arch], out, scheme="w8a8-int8", **options)
    qformat.verify(out)
    assert {(e["module"], e["reason"]) for e in quantization_block(out)["fallback"]} == expected
    check_within_bound(tiny_models[arch], out)


def test_mixed_int8_fp8_and_fallback_via_override(tiny_models, tmp_path):
    out = tmp_path / "mixed"
    qformat.convert(tiny_models["llama"], out, scheme="w8a8-int8",
                    overrides=["re:.*mlp\\..*=fp8-dynamic", "model.layers.0.self_attn.o_proj=none",
                               "model.layers.1.mlp.down_proj=w8a16-int8"])
    qformat.verify(out)
    qc = quantization_block(out)
    stored = {k: v for k, v in checkpoint_tensors(out).items() if k.endswith(".weight") or k.endswith(".weight_scale")}
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.1.mlp.down_proj.weight"].dtype == torch.int8  # exact name beats the regex
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert stored["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32
    assert "model.layers.0.self_attn.o_proj.weight_scale" not in stored
    assert {(e["module"], e["reason"]) for e in qc["fallback"]} == {("lm_head", "default"),
                                                                  ("model.layers.0.self_attn.o_proj", "user")}
    assert set(qc["schemes"]) == {"w8a8-int8", "fp8-dynamic", "w8a16-int8"}
    assert qc["statistics"]["modules"]["model.layers.0.mlp.up_proj"]["observer"] == "mse"  # fp8 default
    assert qc["statistics"]["modules"]["model.layers.0.self_attn.q_proj"]["observer"] == "absmax"
    assert check_within_bound(tiny_models["llama"], out) == 13
    summary = qformat.inspect(out)
    assert summary.modules_per_scheme == {"w8a8-int8": 7, "fp8-dynamic": 5, "w8a16-int8": 1}
    assert "13/15 Linear quantized" in summary.to_text()
