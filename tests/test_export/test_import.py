"""`qformat import`: compressed-tensors checkpoints written by compressed-tensors itself become qformat checkpoints.

Judges: transformers' `CompressedTensorsConfig(dequantize=True)` load of the source and compressed-tensors'
`CompressedTensorsDequantizer` on the source, against qformat's dequantized load of the import. compressed-tensors
multiplies value by scale in the scale's dtype (bf16 for these checkpoints) while qformat widens scales to fp32 and
multiplies there; the product of an 8-bit value and a bf16 scale is exact in fp32, so rounding qformat's fp32 weight
to bf16 is the one rounding compressed-tensors does: weights match bit for bit in bf16, and so do the logits of
bf16 models. fp32-scale checkpoints match in fp32.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qformat
from qformat.checkpoint.dequantize import dequantized_state_dict
from qformat.errors import FormatError, OptionError
from qformat.quantize.sparse24 import decompress_2_4
from qformat.testing.ct_checkpoints import STATIC_INPUT_SCALE, save_ct_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FIXTURE = Path(__file__).parents[1] / "fixtures" / "ct_sparse24"
FIXTURE_EXPECTED = FIXTURE.parent / "ct_sparse24.expected.safetensors"
NOT_LINEAR = ("model.embed_tokens", "re:.*norm$")  # for the dequantizer, which cannot tell classes from names
INT8_CHANNEL_WEIGHT_ONLY = {"weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}

#: name -> (config groups, dtype, the qformat scheme the import must give)
CT_CHECKPOINTS = {
    "W8A8": ({"group_0": ("W8A8", ["Linear"])}, torch.bfloat16, "w8a8-int8"),
    "W8A8-fp32": ({"group_0": ("W8A8", ["Linear"])}, torch.float32, "w8a8-int8"),
    "FP8_DYNAMIC": ({"group_0": ("FP8_DYNAMIC", ["Linear"])}, torch.bfloat16, "fp8-dynamic"),
    "FP8-static": ({"group_0": ("FP8", ["Linear"])}, torch.bfloat16, "fp8-static"),
    "int8-weight-only": ({"group_0": (INT8_CHANNEL_WEIGHT_ONLY, ["Linear"])}, torch.bfloat16, "w8a16-int8"),
}


@pytest.fixture(scope="module")
def ct_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-written")

    @functools.cache
    def get(name: str) -> Path:
        groups, dtype, _ = CT_CHECKPOINTS[name]
        return save_ct_checkpoint(root / name, groups, dtype=dtype)

    return get


@pytest.fixture(scope="module")
def imported(ct_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")

    @functools.cache
    def get(name: str) -> Path:
        return qformat.import_compressed_tensors(ct_checkpoint(name), root / name).output

    return get


def _precision(name: str) -> torch.dtype:
    return CT_CHECKPOINTS[name][1]


@pytest.mark.parametrize("name", list(CT_CHECKPOINTS))
def test_import_matches_transformers_load_of_the_source(ct_checkpoint, imported, judge, name):
    dtype = _precision(name)
    expected = judge.ct_logits(ct_checkpoint(name), dtype)
    got = judge.qformat_logits(imported(name), dtype)
    assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()


@pytest.mark.parametrize("name", list(CT_CHECKPOINTS))
def test_import_matches_compressed_tensors_dequantizer(ct_checkpoint, imported, judge, name):
    static = name == "FP8-static"  # input_scale is no weight: validate() would call it a leftover
    theirs = judge.ct_dequantized(ct_checkpoint(name), ignore=NOT_LINEAR, validate=not static)
    ours = dequantized_state_dict(imported(name))
    dtype = _precision(name)
    modules = [n for n in ours if n.endswith("_proj.weight")]
    assert len(modules) == 14
    for n in modules:
        assert torch.equal(theirs[n], ours[n].to(dtype).float()), n


@pytest.mark.parametrize("name", list(CT_CHECKPOINTS))
def test_imported_checkpoint_is_valid_qformat_and_runs_on_kernels(imported, judge, name):
    from transformers import AutoModelForCausalLM

    from qformat.nn import QuantLinear

    folder = imported(name)
    report = qformat.verify(folder)
    assert (report.quantized_modules, report.fallback_modules, report.linear_modules) == (14, 1, 15)
    qc = judge.quantization_config(folder)
    assert qc["default_scheme"] == CT_CHECKPOINTS[name][2] and qc["overrides"] == []
    assert qc["fallback"][0]["module"] == "lm_head" and qc["fallback"][0]["reason"] == "default"
    # the converter's own entry for a kept output embedding (qformat.plan.rules.default_fallback)
    assert qc["fallback"][0]["detail"] == "output embedding kept in full precision by default"
    assert qc["provenance"]["imported_from"]["format"] == "compressed-tensors"
    assert all(m["rel_error"] is None for m in qc["statistics"]["modules"].values())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        logits = model(judge.input_ids).logits
    assert torch.isfinite(logits).all()
    if name == "FP8-static":
        assert float(model.model.layers[0].mlp.down_proj.input_scale) == float(torch.tensor(STATIC_INPUT_SCALE, dtype=torch.bfloat16))  # stored bf16


def test_tensors_keep_their_bytes_where_the_layouts_agree(ct_checkpoint, imported):
    module = "model.layers.0.self_attn.q_proj"
    with safe_open(ct_checkpoint("W8A8") / "model.safetensors", framework="pt") as fh:
        source_values = fh.get_tensor(f"{module}.weight")
        source_scale = fh.get_tensor(f"{module}.weight_scale")
        assert f"{module}.weight_zero_point" not in fh.keys() or not fh.get_tensor(f"{module}.weight_zero_point").any()
    with safe_open(imported("W8A8") / "model.safetensors", framework="pt") as fh:
        assert torch.equal(fh.get_tensor(f"{module}.weight"), source_values)
        scale = fh.get_tensor(f"{module}.weight_scale")
        assert scale.dtype == torch.float32 and torch.equal(scale, source_scale.float())
        assert not any(k.endswith("zero_point") for k in fh.keys())
    with safe_open(imported("FP8-static") / "model.safetensors", framework="pt") as fh:  # per-tensor -> per-channel
        scale = fh.get_tensor(f"{module}.weight_scale")
        assert scale.shape == (64, 1) and bool((scale == scale[0]).all())


def test_legacy_sparse_24_bitmask_fixture_imports_as_2_4(tmp_path, judge):
    """The fixture was written by compressed-tensors 0.14.0.1; its own decompressor's output is the judge."""
    out = qformat.import_compressed_tensors(FIXTURE, tmp_path / "out")
    assert out.schemes == {"fp8-dynamic+2:4": 7} and len(out.sparse_modules) == 7
    expected = load_file(FIXTURE_EXPECTED)
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as fh:
        for module in out.sparse_modules:
            dense = decompress_2_4(fh.get_tensor(f"{module}.compressed"), fh.get_tensor(f"{module}.bitmask"),
                                   int(fh.get_tensor(f"{module}.shape")[1]))
            assert torch.equal(dense.view(torch.uint8), expected[f"{module}.weight"].view(torch.uint8)), module
            assert torch.equal(fh.get_tensor(f"{module}.weight_scale"), expected[f"{module}.weight_scale"].float())
    qc = judge.quantization_config(tmp_path / "out")
    record = qc["provenance"]["imported_from"]
    assert record["sparsity_format"] == "sparse-24-bitmask" and record["compressed_tensors_version"] == "0.14.0.1"
    from transformers import AutoModelForCausalLM

    from qformat.nn import QuantLinear

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # qformat's 2:4 kernels run it again
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, QuantLinear) and layer.scheme.sparsity == "2:4"
    with torch.no_grad():
        assert torch.isfinite(model(judge.input_ids).logits).all()


def test_dense_checkpoint_in_the_2_4_pattern_is_stored_compressed(tmp_path, judge):
    """A model pruned to 2:4 and quantized by compressed-tensors (stored dense, like Sparse-Llama 2:4 FP8)."""
    source = save_ct_checkpoint(tmp_path / "ct", {"group_0": ("FP8_DYNAMIC", ["Linear"])}, prune_2_4=True)
    result = qformat.import_compressed_tensors(source, tmp_path / "out")
    assert result.schemes == {"fp8-dynamic+2:4": 14}
    assert result.checkpoint_bytes < sum(f.stat().st_size for f in source.glob("*.safetensors"))
    got = judge.qformat_logits(tmp_path / "out", torch.bfloat16)
    assert torch.equal(got, judge.ct_logits(source, torch.bfloat16))


def test_a_fused_group_stays_dense_unless_every_member_is_2_4(tmp_path, judge):
    source = save_ct_checkpoint(tmp_path / "ct", {"group_0": ("W8A8", ["Linear"])}, prune_2_4=True)
    module = "model.layers.0.self_attn.k_proj"
    tensors = load_file(source / "model.safetensors")
    weight = tensors[f"{module}.weight"]
    weight[:, 0:4] = torch.tensor([1, 2, 3, 4], dtype=torch.int8)  # three nonzeros in a group: not 2:4
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    result = qformat.import_compressed_tensors(source, tmp_path / "out")
    assert result.schemes == {"w8a8-int8+2:4": 11, "w8a8-int8": 3}
    kept = judge.quantization_config(tmp_path / "out")["provenance"]["imported_from"]["sparse_2_4_kept_dense"]
    assert set(kept) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}  # k_proj isn't 2:4
    assert "k_proj does not follow 2:4" in kept["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("scheme", ["w8a8-int8", "w8a16-int8", "fp8-dynamic", "fp8-weight-only",
                                    "fp8-dynamic+2:4", "w8a16-int8+2:4"])
def test_export_import_export_is_a_fixed_point(converted, tmp_path, judge, scheme):
    source = converted(scheme)
    first = qformat.export_compressed_tensors(source, tmp_path / "e1").output
    back = qformat.import_compressed_tensors(first, tmp_path / "i1").output
    second = qformat.export_compressed_tensors(back, tmp_path / "e2").output
    assert judge.tensor_table(second) == judge.tensor_table(first)
    assert json.loads((second / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    # and the import restores the qformat checkpoint: the same tensors, schemes and fallback reasons
    assert judge.tensor_table(back) == judge.tensor_table(source)
    original, restored = judge.quantization_config(source), judge.quantization_config(back)
    for key in ("schemes", "default_scheme", "fallback", "fused_groups"):
        assert restored[key] == original[key], key
    assert restored["provenance"]["source"]["base_model"] == "qformat-test/tiny-llama"
    assert restored["provenance"]["tensor_hashes"] == original["provenance"]["tensor_hashes"]


def _edit_config(source: Path, folder: Path, edit) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _set_weights(key: str, value):
    def edit(qc):
        for group in qc["config_groups"].values():
            group["weights"][key] = value
    return edit


@pytest.mark.parametrize(("edit", "words"), [
    (_set_weights("num_bits", 4), "4-bit; qformat v1 stores 8-bit values only"),
    (_set_weights("symmetric", False), "asymmetric"),
    (lambda qc: qc.update(quantization_status="frozen"), "quantization_status is 'frozen'"),
    (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor",
                                           "dynamic": False, "symmetric": True}), "kv cache"),
    (lambda qc: qc.update(transform_config={"config_groups": {"u": {"type": "hadamard"}}}), "transforms"),
    (lambda qc: qc.update(sparsity_config={"format": "sparse-bitmask", "sparsity_structure": "unstructured"}),
     "sparsity format 'sparse-bitmask'"),
    (lambda qc: qc.update(quant_method="gptq"), "quant_method 'gptq'"),
    (lambda qc: qc["config_groups"]["group_0"].update(format="marlin-24"), "format 'marlin-24'"),
])
def test_what_qformat_cannot_represent_is_refused(ct_checkpoint, tmp_path, edit, words):
    folder = _edit_config(ct_checkpoint("W8A8"), tmp_path / "src", edit)
    with pytest.raises((FormatError, OptionError), match=words.replace("(", r"\(").replace(")", r"\)")):
        qformat.import_compressed_tensors(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_group_wise_scales_are_refused_with_the_reason(tmp_path):
    group = {"weights": {"num_bits": 8, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}}
    source = save_ct_checkpoint(tmp_path / "ct", {"group_0": (group, ["Linear"])})
    with pytest.raises(OptionError, match=r"group-wise scales \(group_size 32\).*per-channel weight scales"):
        qformat.import_compressed_tensors(source, tmp_path / "out")


def test_a_fused_group_split_across_schemes_is_refused(tmp_path):
    source = save_ct_checkpoint(tmp_path / "ct", {"group_0": ("FP8_DYNAMIC", ["re:.*q_proj$"]),
                                                  "group_1": ("W8A8", ["re:.*(k|v|o)_proj$", "re:.*mlp.*"])})
    with pytest.raises(OptionError, match=r"q_proj, .*k_proj, .*v_proj are one fused matrix"):
        qformat.import_compressed_tensors(source, tmp_path / "out")


def test_a_tensor_without_a_place_in_the_format_is_refused(ct_checkpoint, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(ct_checkpoint("W8A8"), folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.zeros(64, dtype=torch.int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OptionError, match="up_proj.weight_g_idx has no place in qformat v1"):
        qformat.import_compressed_tensors(folder, tmp_path / "out")


def test_qformat_and_plain_models_are_not_imported(converted, tiny_models, tmp_path):
    with pytest.raises(FormatError, match="already a qformat checkpoint"):
        qformat.import_compressed_tensors(converted("w8a8-int8"), tmp_path / "a")
    with pytest.raises(FormatError, match="no quantization_config.*qformat convert"):
        qformat.import_compressed_tensors(tiny_models["llama"], tmp_path / "b")


def test_the_source_is_never_modified_and_cli_reports_in_one_line(ct_checkpoint, tmp_path, digest):
    source = ct_checkpoint("int8-weight-only")
    before = digest(source)
    run = [sys.executable, "-m", "qformat", "import"]
    ok = subprocess.run([*run, str(source), str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "w8a16-int8" in ok.stdout and "14/15 Linear quantized" in ok.stdout
    assert digest(source) == before
    bad = subprocess.run([*run, str(FIXTURE.parent / "nope"), str(tmp_path / "out2")], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_an_interrupted_import_leaves_nothing(ct_checkpoint, tmp_path, monkeypatch):
    from qformat.export import ct_import

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ct_import, "_qformat_config", boom)
    with pytest.raises(KeyboardInterrupt):
        qformat.import_compressed_tensors(ct_checkpoint("W8A8"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_card_of_an_import_claims_no_weight_error(imported, tmp_path):
    from qformat.cards import check_card, render_card

    folder = tmp_path / "ckpt"
    shutil.copytree(imported("FP8-static"), folder)
    card = render_card(folder)
    assert "imported from a compressed-tensors checkpoint" in card and "only measured figure" not in card
    assert "qformat import SOURCE OUTPUT" in card and "fp8-static" in card
    (folder / "README.md").write_text(card)
    assert check_card(folder) == []
