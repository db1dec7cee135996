"""What smoothing skips is recorded with the reason, and the model is left exactly as it was there."""

from __future__ import annotations

import torch
from transformers import OPTConfig, OPTForCausalLM

from qformat.smooth import SmoothQuant, smooth_model
from qformat.testing.tiny_models import build_tiny_model

SPEC = SmoothQuant(max_tokens=256)


def _reasons(record) -> dict[str, str]:
    """Linear module -> the reason its input was left alone."""
    return {linear: entry["reason"] for entry in record.skipped for linear in entry["linears"]}


def test_bart_records_post_ln_and_gelu_and_folds_only_attention_values(tokenizer):
    model = build_tiny_model("bart")
    record = smooth_model(model, tokenizer, SPEC)
    reasons = _reasons(record)
    post_ln = "post-LN block: the norm output is also the residual"
    assert reasons["model.encoder.layers.0.self_attn.q_proj"] == post_ln
    assert reasons["model.encoder.layers.0.fc1"] == post_ln
    assert reasons["model.decoder.layers.0.encoder_attn.q_proj"] == post_ln
    assert "gelu, not positively homogeneous" in reasons["model.decoder.layers.0.fc2"]
    assert {e["kind"] for e in record.smoothed} == {"linear"}
    assert {e["source"].rsplit(".", 1)[-1] for e in record.smoothed} == {"v_proj"}
    assert not any(n.endswith(("layer_norm.weight", "layer_norm.bias")) for n in record.edits)
    assert record.to_dict()["linear_inputs"] == {"smoothed": 3, "skipped": 14}


def test_post_ln_opt_keeps_its_norms_and_folds_relu_and_values(tokenizer):
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=256, max_position_embeddings=128, do_layer_norm_before=False)).eval()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    record = smooth_model(model, tokenizer, SPEC)
    reasons = _reasons(record)
    for layer in (0, 1):
        assert reasons[f"model.decoder.layers.{layer}.fc1"].startswith("post-LN block")
        assert reasons[f"model.decoder.layers.{layer}.self_attn.k_proj"].startswith("post-LN block")
    assert {e["source"] for e in record.smoothed} >= {"model.decoder.layers.0.fc1"}  # ReLU: exact
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() <= 2e-5 * before.abs().max()


def test_an_architecture_without_exact_folds_is_left_alone_and_recorded(tokenizer):
    model = build_tiny_model("gpt-neox")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = smooth_model(model, tokenizer, SPEC)
    assert record.smoothed == () and record.calibration is None  # nothing to fold: no calibration run
    (entry,) = record.skipped
    assert entry["reason"] == "no exact fold known for gpt_neox" and entry["source"] is None
    assert len(entry["linears"]) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
