"""Converter behaviour beyond the scheme matrix: sources (.bin, shards, the Hub cache), copied files, provenance
without local paths, output sharding, and the refusals (tied heads, fused conflicts, MoE, unknown models)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qformat
from qformat.errors import OptionError, SourceError, UnsupportedModelError


def _qc(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_non_weight_files_are_copied_and_other_weights_skipped(tiny_models, tmp_path, digest):
    src = _copy(tiny_models["xlm-roberta"], tmp_path / "src")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (src / "modules.json").write_text("[]")
    (src / "README.md").write_text("# card\n")
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"\0" * 64)
    (src / "tf_model.h5").write_bytes(b"\0" * 64)
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    before = digest(src)
    out = tmp_path / "out"
    qformat.convert(src, out)
    assert digest(src) == before
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "README.md", "config.json", "model.safetensors", "modules.json",
                     "special_tokens_map.json", "tokenizer_config.json"]
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert _qc(out)["provenance"]["source"]["skipped_weight_files"] == ["onnx/model.onnx", "tf_model.h5"]


def test_bin_source_converts_to_the_same_tensors(tiny_models, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(tiny_models["opt"] / "config.json", src)
    torch.save(load_file(tiny_models["opt"] / "model.safetensors"), src / "pytorch_model.bin")
    a, b = tmp_path / "a", tmp_path / "b"
    qformat.convert(tiny_models["opt"], a)
    qformat.convert(src, b)
    assert _qc(a)["provenance"]["tensor_hashes"] == _qc(b)["provenance"]["tensor_hashes"]
    assert _qc(b)["provenance"]["source"]["format"] == "bin"


def test_sharded_source_and_sharded_output(tiny_models, tmp_path):
    tensors = load_file(tiny_models["llama"] / "model.safetensors")
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", src)
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, src / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single, sharded = tmp_path / "single", tmp_path / "out-sharded"
    qformat.convert(tiny_models["llama"], single)
    qformat.convert(src, sharded, max_shard_size="60KB")
    report = qformat.verify(sharded)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == _qc(sharded)["statistics"]["checkpoint_bytes"]
    for module in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj"):  # a module never spans shards
        assert index["weight_map"][f"{module}.weight"] == index["weight_map"][f"{module}.weight_scale"]
    assert _qc(single)["provenance"]["tensor_hashes"] == _qc(sharded)["provenance"]["tensor_hashes"]
    assert report.tensors == len(_qc(single)["provenance"]["tensor_hashes"])


def _hf_cache_snapshot(model: Path, repo: str, commit: str) -> Path:
    owner, name = repo.split("/")
    root = Path(os.environ["HF_HOME"]) / "hub" / f"models--{owner}--{name}"
    snapshot = root / "snapshots" / commit
    if not snapshot.exists():
        shutil.copytree(model, snapshot)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_repo_id_from_the_cache_and_no_local_paths(tiny_models, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _hf_cache_snapshot(tiny_models["bart"], "test-user/tiny-bart", commit)
    by_id, by_path = tmp_path / "by-id", tmp_path / "by-path"
    qformat.convert("test-user/tiny-bart", by_id, scheme="w8a16-int8")
    qformat.convert(snapshot, by_path, scheme="w8a16-int8")
    for out in (by_id, by_path):
        source = _qc(out)["provenance"]["source"]
        assert (source["repo_id"], source["revision"], source["base_model"]) == ("test-user/tiny-bart", commit,
                                                                                "test-user/tiny-bart")
        text = (out / "config.json").read_text()
        assert str(tmp_path) not in text and os.environ["HF_HOME"] not in text and "/tmp" not in text
    assert _qc(by_id)["provenance"]["command"] == "qformat convert test-user/tiny-bart OUTPUT --scheme w8a16-int8"


def test_local_source_records_base_model_and_exact_options(tiny_models, tmp_path):
    out = tmp_path / "out"
    qformat.convert(tiny_models["llama"], out, scheme="fp8-dynamic", ignore=["re:.*down_proj"], observer="absmax",
                    overrides=["re:.*self_attn.*=w8a8-int8"], base_model="org/llama-tiny", max_shard_size="1GB")
    prov = _qc(out)["provenance"]
    assert prov["source"] == {**prov["source"], "repo_id": None, "revision": None, "base_model": "org/llama-tiny"}
    assert prov["options"] == {"scheme": "fp8-dynamic", "ignore": ["re:.*down_proj"], "observer": "absmax",
                               "overrides": ["re:.*self_attn.*=w8a8-int8"], "sparsity": None, "base_model": "org/llama-tiny",
                               "revision": None, "max_shard_size": 10**9, "dtype": "auto"}
    assert prov["command"] == ("qformat convert org/llama-tiny OUTPUT --scheme fp8-dynamic --ignore 're:.*down_proj' "
                               "--override 're:.*self_attn.*=w8a8-int8' --observer absmax --base-model org/llama-tiny "
                               "--max-shard-size 1000000000")
    assert str(tiny_models["llama"]) not in (out / "config.json").read_text()


def test_untied_output_embedding_can_be_quantized_by_exact_name_only(tiny_models, tmp_path):
    qformat.convert(tiny_models["llama"], tmp_path / "a", overrides=["re:.*=w8a16-int8"])
    assert {e["module"] for e in _qc(tmp_path / "a")["fallback"]} == {"lm_head"}
    qformat.convert(tiny_models["llama"], tmp_path / "b", overrides=["lm_head=w8a16-int8"])
    assert _qc(tmp_path / "b")["fallback"] == []
    assert load_file(tmp_path / "b" / "model.safetensors")["lm_head.weight"].dtype == torch.int8


def test_tied_output_embedding_is_never_quantized(tiny_models, tmp_path):
    with pytest.raises(OptionError, match="lm_head is tied to the input embeddings"):
        qformat.convert(tiny_models["opt"], tmp_path / "out", overrides=["lm_head=w8a8-int8"])
    assert not (tmp_path / "out").exists()


def test_fused_group_with_mixed_schemes_is_refused(tiny_models, tmp_path):
    with pytest.raises(OptionError, match=r"fused modules must share one scheme.*q_proj=fp8-dynamic.*k_proj=w8a8-int8"):
        qformat.convert(tiny_models["llama"], tmp_path / "out", overrides=["model.layers.0.self_attn.q_proj=fp8-dynamic"])


def test_unknown_exact_module_name_is_refused(tiny_models, tmp_path):
    with pytest.raises(OptionError, match="no Linear module with that name"):
        qformat.convert(tiny_models["llama"], tmp_path / "out", ignore=["model.layers.9.mlp.up_proj"])


def test_zero_channels_convert_with_positive_scales(tiny_models, tmp_path):
    src = _copy(tiny_models["llama"], tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][5] = 0.0
    tensors["model.layers.0.mlp.gate_proj.weight"][:] = 0.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    qformat.convert(src, out, scheme="fp8-dynamic")
    qformat.verify(out)
    stored = load_file(out / "model.safetensors")
    assert float(stored["model.layers.0.mlp.up_proj.weight_scale"][5]) == 1.0
    assert bool((stored["model.layers.0.mlp.gate_proj.weight_scale"] == 1.0).all())
    assert _qc(out)["statistics"]["modules"]["model.layers.0.mlp.gate_proj"]["rel_error"] == 0.0


def test_fused_moe_experts_are_refused(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128, num_local_experts=2)).save_pretrained(tmp_path / "moe")
    with pytest.raises(UnsupportedModelError, match="MoE experts as fused 3-D tensors"):
        qformat.convert(tmp_path / "moe", tmp_path / "out")


def test_unknown_architecture_and_already_quantized_sources(tiny_models, tmp_path):
    src = _copy(tiny_models["llama"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "qformat-unknown-arch"}))
    with pytest.raises(UnsupportedModelError, match="does not know model_type 'qformat-unknown-arch'"):
        qformat.convert(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        qformat.convert(src, tmp_path / "out")


def test_missing_and_non_model_sources(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        qformat.convert(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        qformat.convert(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SourceError, match="not in the Hugging Face cache"):
        qformat.convert("nobody/not-cached", tmp_path / "out")


def test_integer_linear_weights_are_refused(tiny_models, tmp_path):
    src = _copy(tiny_models["llama"], tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="up_proj.weight is stored as I8, not a float type"):
        qformat.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlinked_folder_cycles_are_copied_once(tiny_models, tmp_path):
    src = _copy(tiny_models["opt"], tmp_path / "src")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("hi")
    (src / "extra" / "loop").symlink_to(src / "extra", target_is_directory=True)
    out = tmp_path / "out"
    qformat.convert(src, out)
    assert (out / "extra" / "notes.txt").read_text() == "hi"
    assert not (out / "extra" / "loop").exists()
