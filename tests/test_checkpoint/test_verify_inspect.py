"""`verify` names the first problem of a damaged checkpoint; `inspect` reports counts and sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qformat
from qformat.errors import FormatError, UnsupportedFormatVersionError


@pytest.fixture(scope="module")
def good(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    out = {"dense": root / "dense", "sparse": root / "sparse"}
    qformat.convert(tiny_models["llama"], out["dense"], scheme="fp8-dynamic", overrides=["re:.*self_attn.*=w8a8-int8"])
    qformat.convert(tiny_models["llama"], out["sparse"], scheme="w8a16-int8+2:4")
    return out


def _damaged(good: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(good, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _edit_config(good: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(good, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


UP = "model.layers.0.mlp.up_proj"
Q = "model.layers.0.self_attn.q_proj"


def _set(name, value):
    def edit(t):
        t[name] = value(t[name]) if callable(value) else value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set(f"{UP}.weight_scale", lambda s: s.reshape(-1).clone()), r"weight_scale: is F32 \[128\], the spec needs F32 \[128, 1\]"),
    (_set(f"{UP}.weight_scale", lambda s: -s), "scales must be finite and positive"),
    (_set(f"{UP}.weight_scale", lambda s: s.clone().fill_(float("nan"))), "scales must be finite and positive"),
    (_set(f"{UP}.weight_scale", lambda s: s.clone().fill_(1e36)), "every dequantized value is finite"),
    (_set(f"{Q}.weight", lambda w: w.to(torch.float32)), r"q_proj.weight: is F32 \[64, 64\], the spec needs I8"),
    (_set(f"{UP}.weight", lambda w: w.view(torch.uint8).clone().fill_(0x7F).view(torch.float8_e4m3fn)), "holds NaN"),
    (lambda t: t.pop(f"{UP}.weight"), f"{UP}: scheme fp8-dynamic needs a 2-D {UP}.weight"),
    (lambda t: t.pop(f"{UP}.weight_scale"), "statistics.modules and the stored quantized modules disagree"),
    (_set("lm_head.weight", lambda w: w.to(torch.int8)), "kept in full precision .* stores a I8 weight"),
    (_set("lm_head.weight_scale", torch.ones(256, 1)), "lm_head: is in the fallback list but stores quantized tensors"),
    (_set("model.norm.weight", lambda w: w + 1), "model.norm.weight: content hash differs"),
    (lambda t: t.pop("model.norm.weight"), "model.norm.weight: is recorded in provenance.tensor_hashes but missing"),
])
def test_verify_names_the_first_problem(good, tmp_path, edit, match):
    with pytest.raises(FormatError, match=match):
        qformat.verify(_damaged(good["dense"], tmp_path, edit))


def test_verify_checks_2_4_bitmasks(good, tmp_path):
    def three_bits(t):
        t[f"{UP}.bitmask"] = t[f"{UP}.bitmask"].clone()
        t[f"{UP}.bitmask"][0, 0] = 0b0111_0011
    with pytest.raises(FormatError, match="exactly 2"):
        qformat.verify(_damaged(good["sparse"], tmp_path, three_bits))


@pytest.mark.parametrize("edit, error, match", [
    (lambda q: q.update(format_version=3), UnsupportedFormatVersionError, "format version 3"),
    (lambda q: q["fallback"].pop(0), FormatError, "lm_head: is a Linear module that is neither quantized nor in"),
    (lambda q: q["fallback"].append({"module": "model.norm", "reason": "user"}), FormatError,
     "model.norm: is in the fallback list but is not a Linear"),
    (lambda q: q["statistics"]["modules"].pop(UP), FormatError, "statistics.modules"),
    (lambda q: q["overrides"].append({"pattern": UP, "scheme": "w8a8-int8"}), FormatError, "I8"),
])
def test_verify_checks_the_config_against_the_tensors(good, tmp_path, edit, error, match):
    with pytest.raises(error, match=match):
        qformat.verify(_edit_config(good["dense"], tmp_path, edit))


def test_verify_checks_the_index(good, tmp_path):
    folder = tmp_path / "indexed"
    shutil.copytree(good["dense"], folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    keys = list(load_file(folder / "model-00001-of-00001.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    qformat.verify(folder)
    index["weight_map"]["ghost.weight"] = "model-00001-of-00001.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="ghost.weight"):
        qformat.verify(folder)
    index["weight_map"]["ghost.weight"] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="lies outside the model folder"):
        qformat.verify(folder)


def test_inspect_counts_and_sizes(good, tiny_models):
    summary = qformat.inspect(good["dense"])
    assert (summary.quantized_modules, summary.linear_modules) == (14, 15)
    assert summary.modules_per_scheme == {"w8a8-int8": 8, "fp8-dynamic": 6}
    assert summary.fallback_by_reason == {"default": 1}
    assert summary.source_bytes == (tiny_models["llama"] / "model.safetensors").stat().st_size - _header_len(
        tiny_models["llama"] / "model.safetensors")
    assert summary.checkpoint_bytes + _header_len(good["dense"] / "model.safetensors") == (
        good["dense"] / "model.safetensors").stat().st_size
    assert summary.ratio == pytest.approx(summary.source_bytes / summary.checkpoint_bytes)
    text = summary.to_text()
    assert "14/15 Linear quantized (8 w8a8-int8, 6 fp8-dynamic)" in text
    assert "lm_head: default" in text
    assert json.loads(json.dumps(summary.to_dict()))["quantized_modules"] == 14


def _header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")
