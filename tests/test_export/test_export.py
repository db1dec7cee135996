"""`qformat export --to vllm`: judged by transformers' compressed-tensors loader and compressed-tensors' dequantizer.

For every scheme the export's logits under `CompressedTensorsConfig(dequantize=True)` equal qformat's own dequantized
load of the source exactly in fp32: both compute scale * value in fp32 from the same bytes (scales are stored fp32),
so there is nothing to round differently. The same holds weight by weight for `CompressedTensorsDequantizer`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qformat
from qformat.checkpoint.dequantize import dequantized_state_dict
from qformat.errors import OptionError

#: Every dense scheme the export maps to a compressed-tensors format, plus 2:4 variants (written dense).
EXPORT_SCHEMES = ["w8a8-int8", "w8a16-int8", "fp8-dynamic", "fp8-weight-only", "fp8-dynamic+2:4", "w8a16-int8+2:4"]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")

    @functools.cache
    def get(scheme: str):
        out = root / scheme.replace(":", "")
        return out, qformat.export_compressed_tensors(converted(scheme), out)

    return get


def _header(folder: Path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    with safe_open(folder / "model.safetensors", framework="pt") as fh:
        for name in fh.keys():
            s = fh.get_slice(name)
            out[name] = (s.get_dtype(), s.get_shape())
    return out


@pytest.mark.parametrize("scheme", EXPORT_SCHEMES)
def test_transformers_loads_the_export_with_the_sources_logits(converted, exported, judge, scheme):
    folder, _ = exported(scheme)
    expected = judge.qformat_logits(converted(scheme))
    got = judge.ct_logits(folder)
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("scheme", EXPORT_SCHEMES)
def test_compressed_tensors_dequantizer_gives_qformats_weights_bit_for_bit(converted, exported, judge, scheme):
    folder, _ = exported(scheme)
    theirs = judge.ct_dequantized(folder)  # validate(): no quantization parameter left over either
    ours = dequantized_state_dict(converted(scheme))
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name


@pytest.mark.parametrize("scheme", EXPORT_SCHEMES)
def test_export_config_is_what_compressed_tensors_and_vllm_read(converted, exported, judge, scheme):
    from compressed_tensors.quantization import QuantizationConfig

    folder, result = exported(scheme)
    qc = judge.quantization_config(folder)
    source = judge.quantization_config(converted(scheme))
    parsed = QuantizationConfig.model_validate(qc)  # schemes and args forbid unknown keys
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["sparsity_config"] == {} and qc["kv_cache_scheme"] is None
    assert qc["ignore"] == sorted(e["module"] for e in source["fallback"]) == ["lm_head"]
    (group,) = parsed.config_groups.values()
    expected_format = {"w8a8-int8": "int-quantized", "w8a16-int8": "pack-quantized", "fp8-dynamic": "float-quantized",
                       "fp8-weight-only": "naive-quantized"}[scheme.split("+")[0]]
    assert group.format == qc["format"] == expected_format
    assert all("." in t and not t.startswith("re:") for t in group.targets)  # module names, never class names
    assert len(group.targets) == 14
    # only the fields both compressed-tensors 0.17 (vLLM 0.33) and 0.20 define
    assert set(qc["config_groups"]["group_0"]["weights"]) == {"num_bits", "type", "symmetric", "group_size",
                                                             "strategy", "dynamic"}
    assert qc["qformat"]["sparse_2_4_written_dense"] == (sorted(group.targets) if "2:4" in scheme else [])
    assert sorted(result.groups.values()) == [expected_format]


@pytest.mark.parametrize("scheme", EXPORT_SCHEMES)
def test_export_tensors_are_exactly_what_the_vllm_scheme_expects(exported, scheme):
    folder, _ = exported(scheme)
    header = _header(folder)
    module = "model.layers.1.mlp.down_proj"  # [64, 128]
    names = sorted(n[len(module) + 1 :] for n in header if n.startswith(module + "."))
    if scheme.startswith("w8a16"):
        assert names == ["weight_packed", "weight_scale", "weight_shape"]
        assert header[f"{module}.weight_packed"] == ("I32", [64, 32])
        assert header[f"{module}.weight_shape"] == ("I64", [2])
        with safe_open(folder / "model.safetensors", framework="pt") as fh:
            assert fh.get_tensor(f"{module}.weight_shape").tolist() == [64, 128]
    else:
        assert names == ["weight", "weight_scale"]
        assert header[f"{module}.weight"] == ("I8" if "int8" in scheme else "F8_E4M3", [64, 128])
    assert header[f"{module}.weight_scale"] == ("F32", [64, 1])
    assert not any(n.endswith((".compressed", ".bitmask", ".shape")) for n in header)


def test_pack_quantized_matches_compressed_tensors_packer(converted, exported):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    folder, _ = exported("w8a16-int8")
    module = "model.layers.0.self_attn.q_proj"
    with safe_open(converted("w8a16-int8") / "model.safetensors", framework="pt") as fh:
        values = fh.get_tensor(f"{module}.weight")
    with safe_open(folder / "model.safetensors", framework="pt") as fh:
        packed = fh.get_tensor(f"{module}.weight_packed")
    assert torch.equal(packed, pack_to_int32(values, 8))


def test_unchanged_shards_are_hard_linked_not_rewritten(converted, exported):
    folder, result = exported("w8a8-int8")
    source = converted("w8a8-int8") / "model.safetensors"
    assert result.shards == {"model.safetensors": "linked"}
    assert os.stat(folder / "model.safetensors").st_ino == os.stat(source).st_ino
    _, packed = exported("w8a16-int8")
    assert packed.shards == {"model.safetensors": "rewritten"} and len(packed.repacked) == 14


def test_sharded_checkpoint_links_what_it_can(tiny_models, tmp_path, judge):
    source = qformat.convert(tiny_models["llama"], tmp_path / "src", scheme="w8a16-int8",
                             max_shard_size="40KB").output
    result = qformat.export_compressed_tensors(source, tmp_path / "out")
    assert len(result.shards) > 2 and {"linked", "rewritten"} <= set(result.shards.values())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / "out" / file, framework="pt") as fh:
            assert name in fh.keys()
    assert torch.equal(judge.ct_logits(tmp_path / "out"), judge.qformat_logits(source))


def test_mixed_precision_export_is_one_group_per_scheme(tiny_models, tmp_path, judge):
    """int8 attention, fp8 MLP, weight-only int8 in layer 1: three groups, `format: mixed-precision`.

    Judged by compressed-tensors' dequantizer, which resolves every module's group. transformers' dequantizing
    loader is not a judge here: it decompresses every dense module with the first group's scheme
    (`get_dense_scheme` in transformers/integrations/compressed_tensors.py), so no multi-group checkpoint, ours or
    llm-compressor's, dequantizes correctly through it.
    """
    source = qformat.convert(tiny_models["llama"], tmp_path / "src", scheme="w8a8-int8",
                             overrides=["re:.*mlp\\..*=fp8-dynamic", "re:.*layers\\.1\\.self_attn.*=w8a16-int8"]).output
    qformat.export_compressed_tensors(source, tmp_path / "out")
    qc = judge.quantization_config(tmp_path / "out")
    assert qc["format"] == "mixed-precision"
    assert sorted(g["format"] for g in qc["config_groups"].values()) == ["float-quantized", "int-quantized",
                                                                         "pack-quantized"]
    theirs = judge.ct_dequantized(tmp_path / "out")
    for name, tensor in dequantized_state_dict(source).items():
        assert torch.equal(theirs[name], tensor), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "mixes 3 schemes" in card and "from_pretrained" not in card  # no snippet that would load it wrongly


def test_export_card_is_the_vllm_flavour(exported):
    folder, _ = exported("fp8-dynamic+2:4")
    card = (folder / "README.md").read_text()
    assert "vllm serve" in card and "compressed-tensors" in card and "vllm" in card.split("---")[1]
    assert "2:4" in card and "dense" in card  # the sparsity is noted, since vLLM no longer runs it
    assert "base_model: qformat-test/tiny-llama" in card


def test_the_source_is_never_modified(converted, tmp_path, digest):
    source = converted("w8a16-int8+2:4")
    before = digest(source)
    qformat.export_compressed_tensors(source, tmp_path / "out")
    assert digest(source) == before


def _splice_mixed_fused_group(converted, folder: Path) -> Path:
    """A w8a8 checkpoint whose layer-0 q_proj is fp8 (k/v stay int8): valid qformat, unservable by vLLM."""
    shutil.copytree(converted("w8a8-int8"), folder)
    module = "model.layers.0.self_attn.q_proj"
    tensors = {}
    with safe_open(folder / "model.safetensors", framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    with safe_open(converted("fp8-dynamic") / "model.safetensors", framework="pt") as fh:
        for suffix in ("weight", "weight_scale"):
            tensors[f"{module}.{suffix}"] = fh.get_tensor(f"{module}.{suffix}")
    os.unlink(folder / "model.safetensors")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    qc["schemes"]["fp8-dynamic"] = json.loads((converted("fp8-dynamic") / "config.json").read_text())[
        "quantization_config"]["schemes"]["fp8-dynamic"]
    qc["overrides"] = [{"pattern": module, "scheme": "fp8-dynamic"}]
    qc["provenance"].pop("tensor_hashes")
    (folder / "config.json").write_text(json.dumps(config))
    qformat.verify(folder)
    return folder


def test_refuses_a_fused_group_with_mixed_schemes(converted, tmp_path):
    folder = _splice_mixed_fused_group(converted, tmp_path / "mixed")
    with pytest.raises(OptionError, match=r"q_proj.*k_proj.*v_proj.*one scheme") as info:
        qformat.export_compressed_tensors(folder, tmp_path / "out")
    assert "float-quantized" in str(info.value) and "int-quantized" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_refuses_a_quantized_output_embedding(tiny_models, tmp_path):
    source = qformat.convert(tiny_models["llama"], tmp_path / "src", scheme="w8a8-int8",
                             overrides=["lm_head=w8a8-int8"]).output
    with pytest.raises(OptionError, match="lm_head.*vLLM never quantizes"):
        qformat.export_compressed_tensors(source, tmp_path / "out")


def test_cli_export_and_its_errors(converted, tmp_path):
    run = [sys.executable, "-m", "qformat", "export"]
    ok = subprocess.run([*run, str(converted("w8a16-int8")), str(tmp_path / "out"), "--to", "vllm"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "pack-quantized" in ok.stdout and f"vllm serve {tmp_path / 'out'}" in ok.stdout
    again = subprocess.run([*run, str(converted("w8a16-int8")), str(tmp_path / "out"), "--to", "compressed-tensors"],
                           capture_output=True, text=True, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    back = subprocess.run([*run, str(tmp_path / "out"), str(tmp_path / "out2"), "--to", "vllm"],
                          capture_output=True, text=True, check=False)
    assert back.returncode != 0 and "already a compressed-tensors checkpoint" in back.stderr
    assert "Traceback" not in back.stderr
