"""Smoothing folds exactly: the full-precision model's outputs are unchanged (to float32 rounding), while the
factors are far from 1, so a wrong fold would show."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from qformat.smooth import SmoothQuant, smooth_model
from qformat.smooth.factors import group_heads, smoothing_factors, spread_heads
from qformat.testing.tiny_models import build_tiny_model

IDS = torch.tensor([[3, 70, 101, 32, 115, 109, 111, 111, 116, 104, 32, 40, 120, 41, 58, 10, 200, 17, 66, 90]])
SPEC = SmoothQuant(alpha=0.5, max_tokens=256)


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    kwargs = {"decoder_input_ids": IDS} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def _assert_unchanged(before: torch.Tensor, after: torch.Tensor) -> None:
    # float32 rounding of a few multiplications per layer, relative to the logits' scale
    assert (after - before).abs().max() <= 2e-5 * before.abs().max(), (after - before).abs().max()


# expected (Linear inputs smoothed, skipped) for each tiny model
@pytest.mark.parametrize(("arch", "smoothed", "skipped"),
                         [("llama", 14, 1), ("qwen2", 14, 1), ("opt", 12, 3), ("gemma3", 4, 11)])
def test_smoothing_leaves_full_precision_outputs_unchanged(arch, smoothed, skipped, tokenizer, helpers):
    model = helpers.plant_outliers(build_tiny_model(arch))
    if arch == "llama":
        assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    before = _outputs(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = smooth_model(model, tokenizer, SPEC)
    _assert_unchanged(before, _outputs(model))
    assert (record.smoothed_inputs, record.skipped_inputs) == (smoothed, skipped)
    assert max(e["factor_max"] for e in record.smoothed) > 5  # the planted outliers moved: a wrong fold would show
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, params[n])}
    assert changed <= set(record.edits)  # biases initialized to zero stay zero
    assert {n for n in record.edits if n.endswith(".weight")} <= changed
    assert record.calibration["dataset"] == "pydoc-topics/calibration" and record.calibration["tokens"] > 200


def test_a_wrong_fold_would_be_caught(tokenizer, helpers):
    """The check above can fail: dividing a post-LN norm (whose output is also the residual) changes the outputs."""
    model = OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=256, max_position_embeddings=128, do_layer_norm_before=False)).eval()
    before = _outputs(model)
    with torch.no_grad():
        s = torch.linspace(0.5, 8, 64)
        model.model.decoder.layers[0].self_attn_layer_norm.weight /= s
        model.model.decoder.layers[0].self_attn_layer_norm.bias /= s
        model.model.decoder.layers[0].fc1.weight *= s
    assert (_outputs(model) - before).abs().max() > 1e-3 * before.abs().max()


def test_factors_leave_unusable_channels_alone():
    act = torch.tensor([4.0, 0.0, float("nan"), 9.0, 1.0, float("inf")])
    weight = torch.tensor([[1.0, 2.0, 1.0, 0.0, 0.25, 1.0], [-1.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    s = smoothing_factors(act, [weight, 2 * weight], alpha=0.5)
    assert s.dtype == torch.float32
    # channel 0: sqrt(4) / sqrt(max|W| = 2); 1: never seen; 2: NaN; 3: zero weight; 5: infinite -> 1
    assert torch.allclose(s, torch.tensor([2 / 2**0.5, 1, 1, 1, 1 / 0.5**0.5, 1]))
    assert torch.equal(smoothing_factors(act, [weight], alpha=1.0)[0], torch.tensor(4.0))


def test_grouped_query_factors_are_shared_by_the_heads_of_a_kv_head():
    heads, kv_heads, head_dim = 4, 2, 3
    factors = torch.arange(1.0, 1 + heads * head_dim)  # o_proj input channel c = head * head_dim + d
    grouped = group_heads(factors, heads, kv_heads)
    assert grouped.tolist() == [4, 5, 6, 10, 11, 12]  # max over query heads (0, 1) and (2, 3)
    assert spread_heads(grouped, heads, kv_heads).tolist() == [4, 5, 6, 4, 5, 6, 10, 11, 12, 10, 11, 12]


def test_bfloat16_norms_are_rounded_after_folding(tokenizer, helpers):
    model = helpers.plant_outliers(build_tiny_model("llama")).to(torch.bfloat16)
    norm = model.model.layers[0].input_layernorm.weight
    before = norm.detach().float().clone()
    record = smooth_model(model, tokenizer, SPEC)
    assert norm.dtype == torch.bfloat16
    s = record.edits["model.layers.0.input_layernorm.weight"].rows
    assert torch.equal(norm.float(), (before / s).to(torch.bfloat16).float())
