"""Real trained models quantized in memory equal their converted checkpoints, tensor for tensor.

SmolLM2-135M-Instruct (a 30-layer Llama with a tied head, from its GGUF) and all-MiniLM-L6-v2 (BERT): quantizing
while loading (`from_pretrained(..., quantization_config=QFormatConfig(...))`) and in place (`qformat.quantize_`)
must write exactly what `qformat.convert` writes. Tiny random models test this for every architecture; real weights
bring real scale ranges and outliers, where a rounding or dtype difference between the paths would show.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

import qformat
from qformat import QFormatConfig
from qformat.testing.judges import checkpoint_differences, model_class, quantization_block
from qformat.testing.real_models import ModelNotInstalledError, minilm_folder, smollm2_folder


@pytest.fixture(scope="session")
def smollm2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 SmolLM2 folder, kept in pytest's cache between runs (building it takes 30-70 s), or in a temporary
    folder when the cache is off (`-p no:cacheprovider`)."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("qformat-real-models") if cache is not None else tmp_path_factory.mktemp("real-models")
    try:
        return smollm2_folder(root)
    except ModelNotInstalledError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def minilm() -> Path:
    try:
        return minilm_folder()
    except ModelNotInstalledError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-converted")

    @functools.cache
    def get(source: Path, scheme: str) -> Path:
        return qformat.convert(source, root / f"{source.name}-{scheme}", scheme=scheme).output

    return get


# all-MiniLM-L6-v2's file still holds `embeddings.position_ids` (int64, [1, 512]), as old transformers versions
# saved it. convert copies every tensor of the source it does not quantize; the loaded BertModel holds position_ids
# as a non-persistent buffer, so save_pretrained does not write it. Pinned here, exactly: any other difference, or
# the paths agreeing on this one, fails the test.
KNOWN_DIFFERENCES = {"minilm": ["embeddings.position_ids: only in theirs"]}


def _assert_same_checkpoint(ours: Path, converted: Path, known: list[str] | None = None) -> None:
    diffs = checkpoint_differences(ours, converted)
    assert diffs == (known or []), "\n".join(diffs)
    qa, qb = quantization_block(ours), quantization_block(converted)
    for key in ("format_version", "schemes", "default_scheme", "overrides", "fallback", "fused_groups"):
        assert qa[key] == qb[key], key
    assert qa["statistics"]["modules"] == qb["statistics"]["modules"]


def test_smollm2_folder_is_the_real_model(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config and (smollm2 / "tokenizer.json").is_file()
    assert smollm2_folder(smollm2.parent) == smollm2  # reused, not rebuilt


@pytest.mark.parametrize("model, scheme", [("smollm2", "w8a8-int8"), ("minilm", "w8a8-int8"),
                                           ("minilm", "fp8-dynamic")])
def test_quantizing_while_loading_equals_convert(request, converted, tmp_path, model, scheme):
    source = request.getfixturevalue(model)
    expected = converted(source, scheme)
    loaded = model_class(source).from_pretrained(source, quantization_config=QFormatConfig(scheme=scheme))
    loaded.save_pretrained(tmp_path / "saved")
    del loaded
    assert quantization_block(expected)["statistics"]["quantized_modules"] == (210 if model == "smollm2" else 37)
    _assert_same_checkpoint(tmp_path / "saved", expected, KNOWN_DIFFERENCES.get(model))


def test_quantize_in_place_equals_convert(smollm2, converted, tmp_path):
    expected = converted(smollm2, "w8a16-int8")
    model = model_class(smollm2).from_pretrained(smollm2)
    result = qformat.quantize_(model, QFormatConfig(scheme="w8a16-int8"))
    assert len(result.quantized) == quantization_block(expected)["statistics"]["quantized_modules"] == 210
    assert [e.to_dict() for e in result.fallback] == quantization_block(expected)["fallback"]
    model.save_pretrained(tmp_path / "saved")
    _assert_same_checkpoint(tmp_path / "saved", expected)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w8a16-int8", "w8a8-int8", "fp8-dynamic"])
def test_minilm_embeddings_stay_within_cosine_0_99(minilm, converted, scheme):
    """Issue 11's goal for the encoder: every 8-bit scheme keeps each sentence embedding at cosine >= 0.99 to fp32
    (worst sentence, not just the mean), on held-out text."""
    results = {r["metric"]: r for r in qformat.evaluate(converted(minilm, scheme), against=minilm,
                                                        max_tokens=1024).results}
    assert results["min_cosine"]["quantized"] >= 0.99, results["min_cosine"]
    assert results["rank_agreement"]["quantized"] >= 0.99, results["rank_agreement"]
    assert results["mean_cosine"]["tokens"] > 900


@pytest.mark.slow
def test_smollm2_eval_reads_real_perplexity(smollm2, converted):
    """The real model's perplexity on the held-out text is that of a trained LM (not a random one's ~49,000), and
    weight-only int8 changes it by about 1 % (+1.06 % measured on these 512 tokens), its next-token distributions
    barely."""
    results = {r["metric"]: r for r in qformat.evaluate(converted(smollm2, "w8a16-int8"), against=smollm2,
                                                        max_tokens=512).results}
    ppl = results["perplexity"]
    assert 5 < ppl["baseline"] < 40 and 0 < abs(ppl["relative_change"]) < 0.02, ppl
    assert results["top1_agreement"]["quantized"] > 0.9 and results["kl_divergence"]["quantized"] < 0.02
