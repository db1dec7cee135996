"""The same search through every path: convert, quantize_ and from_pretrained give the same fallback; the records
round-trip through the checkpoint into the card and its model-index."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qformat
from qformat import QFormatConfig

from qformat.testing.tiny_models import save_fragile_llama as damaged_llama

BUDGET = {"max_loss": 1e-4, "metric": "kl", "max_tokens": 128}


def _kept(block: dict) -> dict[str, str]:
    return {e["module"]: e["reason"] for e in block["fallback"]}


@pytest.mark.slow
def test_quantize_and_from_pretrained_search_like_convert(tmp_path):
    source = damaged_llama(tmp_path / "damaged", "model.layers.0.mlp.gate_proj")
    qformat.convert(source, tmp_path / "converted", scheme="w8a8-int8", auto_fallback=BUDGET)
    converted = json.loads((tmp_path / "converted" / "config.json").read_text())["quantization_config"]

    model = AutoModelForCausalLM.from_pretrained(source)
    result = qformat.quantize_(model, QFormatConfig(scheme="w8a8-int8", auto_fallback=BUDGET),
                               tokenizer=AutoTokenizer.from_pretrained(source))
    assert {e.module: e.reason for e in result.fallback} == _kept(converted)
    model.save_pretrained(tmp_path / "inplace")
    inplace = json.loads((tmp_path / "inplace" / "config.json").read_text())["quantization_config"]
    assert inplace["fallback_search"]["trials"] == [
        {**t, "seconds": t2["seconds"]} for t, t2 in zip(converted["fallback_search"]["trials"],
                                                         inplace["fallback_search"]["trials"])]

    loaded = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.bfloat16, quantization_config=QFormatConfig(scheme="w8a8-int8", auto_fallback=BUDGET))
    assert type(loaded.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear"
    assert loaded.get_submodule("model.layers.0.mlp.up_proj").weight.dtype == torch.bfloat16  # as asked
    assert type(loaded.get_submodule("model.layers.1.mlp.up_proj")).__name__ == "QuantLinear"
    loaded.save_pretrained(tmp_path / "onload")
    onload = json.loads((tmp_path / "onload" / "config.json").read_text())["quantization_config"]
    assert _kept(onload) == _kept(converted)
    for folder in ("inplace", "onload"):
        qformat.verify(tmp_path / folder)


@pytest.mark.slow
def test_search_records_reach_the_card_and_model_index(tmp_path):
    from huggingface_hub import ModelCard

    source = damaged_llama(tmp_path / "damaged", "model.layers.0.mlp.gate_proj")
    out = tmp_path / "q"
    qformat.convert(source, out, scheme="w8a8-int8", auto_fallback=BUDGET, base_model="someone/tiny-llama")
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    from qformat.cards.render import write_card
    from qformat.cards.check import check_card

    write_card(out)
    card = ModelCard.load(out / "README.md")
    results = card.data.eval_results
    recorded = {(r["metric"], r["quantized"]) for r in block["evaluation"]}
    assert {(r.metric_type, r.metric_value) for r in results} == recorded
    assert {r.dataset_type for r in results} == {"pydoc-topics/heldout"}
    text = (out / "README.md").read_text()
    assert "sensitivity" in text and "model.layers.0.mlp.up_proj" in text
    assert f"{block['fallback_search']['evaluations']}" in text
    assert check_card(out) == []
