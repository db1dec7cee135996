"""`convert(dtype=...)` / `qformat convert --dtype`: the dtype of the tensors kept in full precision.

Copied float tensors are cast exactly as `from_pretrained(dtype=...)` casts them (`Tensor.to`, round to nearest
even); quantized tensors, integer tensors and the scales are untouched; config.json names the dtype chosen; "auto"
follows config.json's `dtype`/`torch_dtype`, else keeps what is stored.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import qformat
from qformat.cli.main import cli
from qformat.errors import OptionError

SCHEME = "w8a16-int8"
#: Copied (full-precision) tensors of the tiny Llama: embedding, norms and the output embedding (kept by default).
COPIED = ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
          "model.layers.1.post_attention_layernorm.weight", "lm_head.weight")
QUANTIZED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale",
             "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight_scale")


def _header(folder: Path) -> dict[str, dict]:
    data = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    header.pop("__metadata__", None)
    return header


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _checkpoint_bytes(folder: Path) -> int:
    return _config(folder)["quantization_config"]["statistics"]["checkpoint_bytes"]


def _source_with_config(tiny_models, tmp_path: Path, **changes) -> Path:
    """A copy of the fp32 tiny Llama whose config.json has `changes` applied (a value of None deletes the key)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    config = _config(src)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.fixture(scope="module")
def as_stored(tiny_models, tmp_path_factory) -> Path:
    """The fp32 tiny Llama converted without --dtype (its config says float32: nothing is cast)."""
    out = tmp_path_factory.mktemp("dtype") / "as-stored"
    qformat.convert(tiny_models["llama"], out, scheme=SCHEME)
    return out


@pytest.fixture(scope="module")
def as_bf16(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dtype") / "bf16"
    qformat.convert(tiny_models["llama"], out, scheme=SCHEME, dtype="bfloat16")
    return out


def test_bfloat16_casts_copied_tensors_as_transformers_does(tiny_models, as_stored, as_bf16):
    source = load_file(tiny_models["llama"] / "model.safetensors")
    ours, header = load_file(as_bf16 / "model.safetensors"), _header(as_bf16)
    rounded_differently = 0
    for name in COPIED:
        assert source[name].dtype == torch.float32
        assert header[name]["dtype"] == "BF16"
        assert torch.equal(ours[name], source[name].to(torch.bfloat16))
        truncated = (source[name].view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
        rounded_differently += int((ours[name] != truncated).sum())
    assert rounded_differently > 0  # the comparison above can tell rounding from truncation
    plain = load_file(as_stored / "model.safetensors")
    for name in QUANTIZED:  # quantization reads the stored fp32 values, whatever --dtype says
        assert torch.equal(ours[name], plain[name])
        assert header[name]["dtype"] == _header(as_stored)[name]["dtype"]
    assert {h["dtype"] for h in header.values()} == {"BF16", "I8", "F32"}
    assert all(n.endswith(".weight_scale") for n, h in header.items() if h["dtype"] == "F32")  # scales stay fp32


def test_bfloat16_records_the_dtype_and_halves_the_copied_bytes(as_stored, as_bf16):
    config = _config(as_bf16)
    assert config["dtype"] == "bfloat16"
    assert "torch_dtype" not in config
    qc = config["quantization_config"]
    assert qc["provenance"]["options"]["dtype"] == "bfloat16"
    assert "--dtype bfloat16" in qc["provenance"]["command"]
    copied = sum(torch.Size(h["shape"]).numel() for n, h in _header(as_stored).items()
                 if h["dtype"] == "F32" and not n.endswith(".weight_scale"))
    before, after = _checkpoint_bytes(as_stored), _checkpoint_bytes(as_bf16)
    assert before - after == 2 * copied  # each copied fp32 value now takes 2 bytes instead of 4
    assert (as_bf16 / "model.safetensors").stat().st_size < (as_stored / "model.safetensors").stat().st_size
    report = qformat.verify(as_bf16)
    assert report.hashes_checked == report.tensors


@pytest.mark.parametrize(("key", "name", "code"), [("dtype", "bfloat16", "BF16"), ("torch_dtype", "float16", "F16")])
def test_auto_follows_the_config_dtype(tiny_models, tmp_path, key, name, code):
    src = _source_with_config(tiny_models, tmp_path, **{"dtype": None, "torch_dtype": None, key: name})
    out = tmp_path / "out"
    qformat.convert(src, out, scheme=SCHEME)
    header, ours = _header(out), load_file(out / "model.safetensors")
    source = load_file(src / "model.safetensors")
    for tensor in COPIED:
        assert header[tensor]["dtype"] == code
        assert torch.equal(ours[tensor], source[tensor].to(getattr(torch, name)))
    config = _config(out)
    assert config[key] == name
    assert config["quantization_config"]["provenance"]["options"]["dtype"] == "auto"
    if key == "torch_dtype":  # an older config keeps its own key; none is added
        assert "dtype" not in config
    qformat.verify(out)


@pytest.mark.parametrize("value", [None, "float64"])
def test_auto_without_a_usable_config_dtype_keeps_what_is_stored(tiny_models, as_stored, tmp_path, value):
    src = _source_with_config(tiny_models, tmp_path, dtype=value, torch_dtype=None)
    out = tmp_path / "out"
    qformat.convert(src, out, scheme=SCHEME)
    assert all(_header(out)[t]["dtype"] == "F32" for t in COPIED)
    hashes = _config(out)["quantization_config"]["provenance"]["tensor_hashes"]
    assert hashes == _config(as_stored)["quantization_config"]["provenance"]["tensor_hashes"]
    assert _config(out).get("dtype") == value  # the config is left as it was


def test_bfloat16_source_upcast_to_float32_exactly(tiny_llama_bf16, tmp_path):
    out = tmp_path / "out"
    qformat.convert(tiny_llama_bf16, out, scheme=SCHEME, dtype="float32")
    source, ours = load_file(tiny_llama_bf16 / "model.safetensors"), load_file(out / "model.safetensors")
    for name in COPIED:
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], source[name].float())
    assert _config(out)["dtype"] == "float32"


def test_integer_tensors_are_never_cast(tiny_models, tmp_path):
    src = _source_with_config(tiny_models, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.step_counter"] = torch.arange(5, dtype=torch.int64)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    qformat.convert(src, out, scheme=SCHEME, dtype="float16")
    assert _header(out)["model.step_counter"]["dtype"] == "I64"
    assert torch.equal(load_file(out / "model.safetensors")["model.step_counter"], torch.arange(5))


def test_a_float16_overflow_is_refused(tiny_models, tmp_path, digest):
    src = _source_with_config(tiny_models, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"][3] = 1e5
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(OptionError, match=r"float16 cannot hold model\.norm\.weight.*1e\+05.*--dtype bfloat16"):
        qformat.convert(src, out, scheme=SCHEME, dtype="float16")
    assert not out.exists()
    qformat.convert(src, out, scheme=SCHEME, dtype="bfloat16")  # bfloat16 has fp32's range


def test_converted_bfloat16_loads_in_bfloat16_with_dtype_auto(as_bf16):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(as_bf16, dtype="auto")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_cli_dtype(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(tiny_models["llama"]), str(out), "--scheme", SCHEME,
                                      "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert _header(out)["model.embed_tokens.weight"]["dtype"] == "BF16"


def test_cli_refuses_an_unknown_dtype_in_one_line(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(tiny_models["llama"]), str(out), "--dtype", "int8"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "dtype must be one of auto, bfloat16, float16, float32" in lines[0], result.output
    assert not out.exists()


def test_config_dtype_keys_are_read_and_set_as_transformers_reads_them():
    from qformat.converter.layout import declare_dtype, resolve_dtype

    assert resolve_dtype("auto", {"dtype": "bfloat16", "torch_dtype": "float32"}) == "bfloat16"  # `dtype` wins
    assert resolve_dtype("auto", {"dtype": None, "torch_dtype": "torch.float16"}) == "float16"
    assert resolve_dtype("auto", {"dtype": "float64"}) is None
    assert resolve_dtype("float32", {"dtype": "bfloat16"}) == "float32"
    composite = {"torch_dtype": "float32", "text_config": {"torch_dtype": "float32"}, "vision_config": {"x": 1}}
    assert declare_dtype(composite, "bfloat16") == {"torch_dtype": "bfloat16", "text_config": {
        "torch_dtype": "bfloat16"}, "vision_config": {"x": 1}}
    assert declare_dtype({"model_type": "llama"}, "float16") == {"model_type": "llama", "dtype": "float16"}
    assert declare_dtype({"dtype": "float32"}, None) == {"dtype": "float32"}
