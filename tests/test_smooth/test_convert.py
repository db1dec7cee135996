"""`qformat convert --smoothquant` writes an ordinary W8A8 checkpoint: verify passes, transformers loads it, the
export to compressed-tensors works unchanged, and its tensors are those `quantize_` gives for the same recipe."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qformat
from qformat.cli.main import cli
from qformat.plan.recipe import QuantRecipe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CALIB = "SmoothQuant reads calibration text like this one.\n\n" * 40


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def smoothed(outlier_llama, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sq") / "llama-sq"
    result = CliRunner().invoke(cli, ["convert", str(outlier_llama), str(out), "--scheme", "w8a8-int8",
                                      "--smoothquant", "--alpha", "0.6", "--calib", str(calib_file),
                                      "--smooth-tokens", "256"])
    assert result.exit_code == 0, result.output
    return out


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_the_checkpoint_is_an_ordinary_one_that_records_the_smoothing(smoothed, calib_file):
    qformat.verify(smoothed)
    block = _config(smoothed)
    record = block["provenance"]["smoothquant"]
    assert record["alpha"] == 0.6
    assert record["calibration"] == {"dataset": "calib.txt", "tokens": 256,
                                     "text_sha256": hashlib.sha256(CALIB.encode()).hexdigest()}
    assert record["linear_inputs"] == {"smoothed": 14, "skipped": 1}
    assert block["provenance"]["options"]["smoothquant"] == {"alpha": 0.6, "calib": "calib.txt", "max_tokens": 256}
    assert "--smoothquant --alpha 0.6 --calib calib.txt --smooth-tokens 256" in block["provenance"]["command"]
    assert str(calib_file.parent) not in json.dumps(block)  # no local paths
    # ordinary W8A8 tensors: int8 weights and float32 scales, norms in full precision
    tensors = load_file(smoothed / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.float32


def test_transformers_loads_it_and_it_stays_close_to_the_source(smoothed, outlier_llama):
    ids = torch.tensor([[3, 70, 101, 32, 115, 109, 111, 111, 116, 104]])
    source = AutoModelForCausalLM.from_pretrained(outlier_llama, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(smoothed, dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, qformat.nn.QuantLinear)
    with torch.no_grad():
        ref, got = source(ids).logits, loaded(ids).logits
    assert (got - ref).norm() / ref.norm() < 0.1


def test_convert_and_quantize_write_the_same_tensors(smoothed, outlier_llama, calib_file, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(outlier_llama, dtype=torch.float32)
    recipe = QuantRecipe(scheme="w8a8-int8", smoothquant={"alpha": 0.6, "calib": str(calib_file), "max_tokens": 256})
    qformat.quantize_(model, recipe, tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "mem")
    converted, in_memory = load_file(smoothed / "model.safetensors"), load_file(tmp_path / "mem" / "model.safetensors")
    assert converted.keys() == in_memory.keys()
    different = [k for k in converted if not torch.equal(converted[k], in_memory[k])]
    assert different == []
    assert _config(tmp_path / "mem")["provenance"]["smoothquant"] == _config(smoothed)["provenance"]["smoothquant"]


def test_the_card_says_how_it_was_smoothed(smoothed, tmp_path):
    from qformat.cards.render import render_card

    card = render_card(smoothed)
    line = next(line for line in card.splitlines() if "SmoothQuant" in line)
    sha = hashlib.sha256(CALIB.encode()).hexdigest()[:12]
    assert "alpha 0.6" in line and "`calib.txt`" in line and sha in line and "256 tokens" in line
    assert "14 of 15 Linear inputs smoothed, 1 left alone" in line


def test_the_export_to_compressed_tensors_works_unchanged(smoothed, tmp_path):
    from transformers import CompressedTensorsConfig

    out = tmp_path / "vllm"
    qformat.export_compressed_tensors(smoothed, out)
    ours, theirs = load_file(smoothed / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale"):
        assert torch.equal(theirs[name].reshape(ours[name].shape), ours[name]), name
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                 dtype=torch.float32)
    dequantized = AutoModelForCausalLM.from_pretrained(
        smoothed, quantization_config=qformat.QFormatConfig(dequantize=True), dtype=torch.float32)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, dequantized.model.layers[0].input_layernorm.weight)


def _w8a8_error(model, tokenizer, smoothquant) -> float:
    from qformat.eval.data import builtin_text

    ids = tokenizer(builtin_text("heldout").text[:2000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        quantized = copy.deepcopy(model)
        qformat.quantize_(quantized, scheme="w8a8-int8", smoothquant=smoothquant, tokenizer=tokenizer)
        out = quantized(input_ids=ids).logits
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_smoothing_shrinks_w8a8_error_on_activation_outliers(arch, tokenizer, helpers):
    from qformat.testing.tiny_models import build_tiny_model

    model = helpers.plant_outliers(build_tiny_model(arch))
    plain = _w8a8_error(model, tokenizer, None)
    smoothed = _w8a8_error(model, tokenizer, {"alpha": 0.5, "max_tokens": 512})
    assert smoothed < 0.7 * plain, (plain, smoothed)  # measured: llama 0.065 -> 0.035, opt 0.035 -> 0.020


@pytest.mark.parametrize(("args", "message"), [
    (["--smoothquant", "--alpha", "1.5"], "--alpha must be a number between 0 and 1"),
    (["--alpha", "0.5"], "--alpha only applies with --smoothquant"),
    (["--smoothquant", "--calib", "/nonexistent/calib.txt"], "calib.txt"),
    (["--smoothquant", "--scheme", "w8a16-int8"], "--smoothquant helps schemes that quantize activations"),
])
def test_bad_options_are_one_line_errors(outlier_llama, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["convert", str(outlier_llama), str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_fallback_search_runs_on_the_smoothed_model(outlier_llama, tokenizer, tmp_path):
    """One full-precision load serves both: the search's baseline is the smoothed model's, and convert and quantize_
    still agree byte for byte."""
    budget = {"max_loss": 1e-4, "metric": "kl", "max_tokens": 128}
    sq = {"alpha": 0.5, "max_tokens": 128}
    result = qformat.convert(outlier_llama, tmp_path / "both", scheme="w8a8-int8", smoothquant=sq,
                             auto_fallback=budget)
    block = _config(result.output)
    assert block["provenance"]["smoothquant"]["linear_inputs"]["smoothed"] == 14
    assert block["fallback_search"] is not None and result.search is not None
    model = AutoModelForCausalLM.from_pretrained(outlier_llama, dtype=torch.float32)
    qformat.quantize_(model, QuantRecipe(scheme="w8a8-int8", smoothquant=sq, auto_fallback=budget),
                      tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "mem")
    converted = load_file(result.output / "model.safetensors")
    in_memory = load_file(tmp_path / "mem" / "model.safetensors")
    assert converted.keys() == in_memory.keys()
    assert all(torch.equal(converted[k], in_memory[k]) for k in converted)
    qformat.verify(result.output)


def test_the_card_names_the_outlier_threshold(outlier_llama, tmp_path):
    from qformat.cards.render import render_card

    out = qformat.convert(outlier_llama, tmp_path / "int8", scheme="w8a8-int8", outlier_threshold=6.0).output
    card = render_card(out)
    lines = [line for line in card.splitlines() if "LLM.int8() outlier decomposition" in line]
    assert len(lines) == 1 and "threshold 6:" in lines[0] and "|x| >= 6 are multiplied in float32" in lines[0]
    assert "--outlier-threshold 6" in card  # the reproduce command
    assert not any("LLM.int8()" in line for line in render_card(qformat.convert(
        outlier_llama, tmp_path / "plain", scheme="w8a8-int8").output).splitlines())


def test_from_pretrained_with_smoothquant_writes_what_convert_writes(smoothed, outlier_llama, calib_file, tmp_path):
    """QFormatConfig(smoothquant=...) loads in float32, smooths, quantizes; save_pretrained then holds convert's
    tensors, byte for byte."""
    config = qformat.QFormatConfig(scheme="w8a8-int8", smoothquant={"alpha": 0.6, "calib": str(calib_file),
                                                                    "max_tokens": 256})
    model = AutoModelForCausalLM.from_pretrained(outlier_llama, quantization_config=config)
    assert model.config.quantization_config.checkpoint.provenance["smoothquant"]["alpha"] == 0.6
    model.save_pretrained(tmp_path / "saved")
    saved, converted = load_file(tmp_path / "saved" / "model.safetensors"), load_file(smoothed / "model.safetensors")
    assert set(saved) == set(converted)
    assert all(torch.equal(saved[name], converted[name]) for name in converted)
