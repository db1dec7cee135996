"""`qformat eval` / `qformat.evaluate`: metrics per model kind, determinism, recording into the checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import qformat
from qformat.cli.main import cli
from qformat.errors import OptionError
from qformat.eval import builtin_text, load_text, loss_of, metric, result_record
from qformat.eval.metrics import rouge_l, spearman
from qformat.testing.tiny_models import save_byte_tokenizer, save_tiny_model


def _convert(source: Path, out: Path, scheme: str = "w8a8-int8") -> Path:
    qformat.convert(source, out, scheme=scheme)
    return out


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_builtin_texts_are_disjoint_and_identified():
    texts = [builtin_text(s) for s in ("calibration", "search", "heldout")]
    assert len({t.sha256 for t in texts}) == 3
    blocks = [{" ".join(p.split()) for p in t.text.split("\n\n")} for t in texts]
    assert all(len(b) > 300 for b in blocks)
    assert not (blocks[0] & blocks[1]) and not (blocks[1] & blocks[2]) and not (blocks[0] & blocks[2])
    assert load_text("heldout") == texts[2] and load_text("pydoc-topics/search") == texts[1]


def test_loss_and_recovery_follow_each_metric_direction():
    assert loss_of(metric("ppl"), 10.0, 10.1) == pytest.approx(0.01)
    assert loss_of(metric("cosine"), 1.0, 0.995) == pytest.approx(0.005)
    assert loss_of(metric("kl"), 0.0, 0.02) == pytest.approx(0.02)
    ppl = result_record("perplexity", task="text-generation", text={"dataset": "t", "text_sha256": "x", "tokens": 9},
                        baseline=10.0, quantized=12.5, command="c")
    assert ppl["relative_change"] == pytest.approx(0.25) and ppl["recovery"] == pytest.approx(0.8)
    cos = result_record("mean_cosine", task="feature-extraction", text={}, baseline=1.0, quantized=0.99, command="c")
    assert cos["recovery"] == pytest.approx(0.99) and cos["higher_is_better"] is True
    kl = result_record("kl_divergence", task="text-generation", text={}, baseline=0.0, quantized=0.1, command="c")
    assert kl["recovery"] is None and kl["relative_change"] is None
    with pytest.raises(OptionError, match="unknown metric"):
        metric("bleu")


def test_rank_and_rouge_scorers():
    import torch

    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a * 2) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["the cat sat on the mat"], ["a dog ran"]) < 0.2


@pytest.mark.slow
def test_causal_lm_eval_against_source_is_deterministic(readable, tmp_path):
    source = readable("llama")
    out = _convert(source, tmp_path / "q")
    first = qformat.evaluate(out, against=source, max_tokens=256)
    second = qformat.evaluate(out, against=source, max_tokens=256)
    assert first.results == second.results
    by_metric = {r["metric"]: r for r in first.results}
    assert set(by_metric) == {"perplexity", "kl_divergence", "top1_agreement"}
    ppl = by_metric["perplexity"]
    assert ppl["tokens"] == 256 and ppl["dataset"] == "pydoc-topics/heldout"
    assert ppl["text_sha256"] == builtin_text("heldout").sha256
    assert math.isfinite(ppl["baseline"]) and ppl["quantized"] != ppl["baseline"]  # int8 changes something
    assert by_metric["kl_divergence"]["quantized"] > 0
    assert ppl["command"] == "qformat eval OUTPUT --against SOURCE --text pydoc-topics/heldout --max-tokens 256"
    # the source against itself: no change at all
    same = {r["metric"]: r for r in qformat.evaluate(source, against=source, max_tokens=128).results}
    assert same["kl_divergence"]["quantized"] == pytest.approx(0, abs=1e-9)
    assert same["top1_agreement"]["quantized"] == 1.0


@pytest.mark.slow
def test_eval_record_changes_only_the_evaluation(readable, tmp_path):
    source = readable("llama")
    out = _convert(source, tmp_path / "q")
    before = _file_hashes(out)
    config_before = json.loads((out / "config.json").read_text())
    result = CliRunner().invoke(cli, ["eval", str(out), "--against", str(source), "--max-tokens", "128", "--record"])
    assert result.exit_code == 0, result.output
    after = _file_hashes(out)
    assert {k for k in before if before[k] != after[k]} == {"config.json"}
    config_after = json.loads((out / "config.json").read_text())
    recorded = config_after["quantization_config"].pop("evaluation")
    config_before["quantization_config"].pop("evaluation")
    assert config_after == config_before  # nothing else moved, tensor hashes included
    assert [r["metric"] for r in recorded] == ["perplexity", "kl_divergence", "top1_agreement"]
    qformat.verify(out)
    # recording again with the same text replaces, another text adds
    CliRunner().invoke(cli, ["eval", str(out), "--against", str(source), "--max-tokens", "128", "--record"])
    assert len(json.loads((out / "config.json").read_text())["quantization_config"]["evaluation"]) == 3
    CliRunner().invoke(cli, ["eval", str(out), "--text", "search", "--max-tokens", "128", "--record"])
    entries = json.loads((out / "config.json").read_text())["quantization_config"]["evaluation"]
    assert len(entries) == 4 and entries[-1]["dataset"] == "pydoc-topics/search" and entries[-1]["baseline"] is None
    CliRunner().invoke(cli, ["eval", str(out), "--text", "search", "--max-tokens", "256", "--record"])  # another
    assert len(json.loads((out / "config.json").read_text())["quantization_config"]["evaluation"]) == 5


@pytest.mark.slow
def test_eval_of_an_encoder_and_a_seq2seq_model(readable, tmp_path):
    enc = readable("xlm-roberta")
    out = _convert(enc, tmp_path / "enc")
    values = {r["metric"]: r["quantized"] for r in qformat.evaluate(out, against=enc, max_tokens=256).results}
    assert set(values) == {"mean_cosine", "min_cosine", "rank_agreement"}
    assert 0.9 < values["min_cosine"] <= values["mean_cosine"] <= 1.0
    other = save_byte_tokenizer(save_tiny_model("xlm-roberta", tmp_path / "other", seed=1))
    unrelated = {r["metric"]: r["quantized"] for r in qformat.evaluate(other, against=enc, max_tokens=256).results}
    assert unrelated["mean_cosine"] < values["mean_cosine"] - 0.01  # the metric tells models apart
    with pytest.raises(OptionError, match="--against"):
        qformat.evaluate(out, max_tokens=256)
    s2s = readable("bart")
    out = _convert(s2s, tmp_path / "bart")
    results = {r["metric"]: r for r in qformat.evaluate(out, against=s2s, max_tokens=256).results}
    assert set(results) == {"loss", "rougeL"}
    assert results["loss"]["task"] == "text2text-generation" and results["loss"]["baseline"] > 0
    assert 0 <= results["rougeL"]["quantized"] <= 1


def test_eval_errors_are_one_line(readable, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["eval", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no config.json" in missing.output
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad_text = runner.invoke(cli, ["eval", str(readable("llama")), "--text", str(empty)])
    assert bad_text.exit_code == 2 and "is empty" in bad_text.output
    not_utf8 = tmp_path / "bin.txt"
    not_utf8.write_bytes(b"\xff\xfe\x00abc")
    assert "not UTF-8" in runner.invoke(cli, ["eval", str(readable("llama")), "--text", str(not_utf8)]).output
    plain = runner.invoke(cli, ["eval", str(readable("llama")), "--max-tokens", "64", "--record"])
    assert plain.exit_code == 2 and "not a qformat checkpoint" in plain.output
    assert len(plain.output.strip().splitlines()) == 1 or "Traceback" not in plain.output


@pytest.mark.slow
def test_perplexity_upper_bound_is_paired_and_above_the_measurement(readable, tmp_path):
    """The bound the fallback search compares with its budget: >= the measured perplexity, and equal to the
    source's own perplexity when the model is the source (paired differences all zero)."""
    from transformers import AutoTokenizer

    from qformat.eval import load_model, make_task

    source = readable("llama")
    quantized = load_model(_convert(source, tmp_path / "q"))
    fp = load_model(source)
    task = make_task(fp, AutoTokenizer.from_pretrained(source), load_text("search"), max_tokens=256)
    reference = task.reference(fp, cache=None)
    assert not reference.has_outputs and len(reference.token_losses) == 254
    assert task.measure(fp, reference)["perplexity"] == pytest.approx(task.upper["perplexity"], rel=1e-12)
    value = task.measure(quantized, reference)["perplexity"]
    assert task.upper["perplexity"] > value and set(task.measure(quantized, reference)) == {"perplexity"}
