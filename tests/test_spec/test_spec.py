"""The spec layer: schemes, patterns and precedence, fused groups, layout formulas, config parsing and versions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qformat.errors import FormatError, OptionError, UnsupportedFormatVersionError
from qformat.spec import (
    BUILTIN_SCHEMES,
    FallbackEntry,
    CheckpointConfig,
    QuantArgs,
    Scheme,
    first_match,
    fused_groups_for,
    fused_mismatch,
    group_modules,
    module_tensors,
    pattern_matches,
    quantized_nbytes,
    resolve_scheme_name,
    scheme_names,
    shape_problem,
)
from qformat.spec.layout import (
    DENSE_SUFFIXES,
    QUANTIZED_MARKER,
    SCALE_SUFFIXES,
    SPARSE_SUFFIXES,
    VALUE_DTYPES,
    WEIGHT_SUFFIXES,
)


def test_spec_imports_without_torch():
    code = "import qformat.spec, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", scheme_names())
def test_every_scheme_name_resolves_and_round_trips(name):
    canonical, scheme = resolve_scheme_name(name.upper())
    assert canonical == name
    assert (scheme.sparsity == "2:4") == name.endswith("+2:4")
    assert type(scheme).from_dict(scheme.to_dict()) == scheme


def test_sparsity_option_adds_2_4_and_unknown_names_fail():
    assert resolve_scheme_name("fp8-dynamic", sparsity="2:4")[0] == "fp8-dynamic+2:4"
    with pytest.raises(OptionError, match="unknown scheme 'int4'"):
        resolve_scheme_name("int4")


def test_builtin_schemes_match_their_names():
    assert BUILTIN_SCHEMES["w8a16-int8"].input_activations is None
    assert BUILTIN_SCHEMES["w8a8-int8"].input_activations.strategy == "token"
    assert BUILTIN_SCHEMES["fp8-dynamic"].weights.type == "float"
    assert BUILTIN_SCHEMES["fp8-weight-only"].input_activations is None


def test_patterns_use_re_match_anchored_at_start_only():
    name = "model.layers.0.mlp.down_proj"
    assert pattern_matches("re:.*down_proj", name)
    assert pattern_matches("re:model\\.layers\\.0", name)  # prefix match: not anchored at the end
    assert not pattern_matches("re:mlp", name)  # anchored at the start
    assert pattern_matches(name, name)
    assert not pattern_matches("down_proj", name)  # exact names are exact


def test_exact_names_beat_regex_and_first_regex_wins():
    rules = [("re:.*proj", "a"), ("re:.*down_proj", "b"), ("model.mlp.down_proj", "c")]
    assert first_match(rules, "model.mlp.down_proj") == ("model.mlp.down_proj", "c")
    assert first_match(rules, "model.mlp.up_proj") == ("re:.*proj", "a")
    assert first_match(rules[1:2], "model.mlp.up_proj") is None


def test_config_precedence_fallback_then_exact_then_regex_then_default():
    schemes = {n: BUILTIN_SCHEMES[n] for n in ("w8a8-int8", "fp8-dynamic", "w8a16-int8")}
    config = CheckpointConfig(
        schemes=schemes, default_scheme="w8a8-int8",
        overrides=(("re:.*mlp.*", "fp8-dynamic"), ("m.mlp.gate", "w8a16-int8")),
        fallback=(FallbackEntry(module="m.mlp.up", reason="user", detail="--ignore m.mlp.up"),),
    )
    assert config.scheme_for("m.mlp.up") is None
    assert config.scheme_for("m.mlp.gate")[0] == "w8a16-int8"
    assert config.scheme_for("m.mlp.down")[0] == "fp8-dynamic"
    assert config.scheme_for("m.attn.q")[0] == "w8a8-int8"


def _minimal(**extra):
    data = {"quant_method": "qformat", "format_version": 1, "default_scheme": "w8a8-int8",
            "schemes": {"w8a8-int8": BUILTIN_SCHEMES["w8a8-int8"].to_dict()}}
    data.update(extra)
    return data


def test_config_round_trip_and_unknown_keys_ignored():
    config = CheckpointConfig.from_dict(_minimal(future_key={"x": 1}, fallback=[{"module": "lm_head", "reason": "default",
                                                                              "new_field": 3}]))
    again = CheckpointConfig.from_dict(config.to_dict())
    assert again == config
    assert "future_key" not in config.to_dict()


@pytest.mark.parametrize("version", [3, 0, "1", None])
def test_unknown_major_version_is_refused(version):
    with pytest.raises(FormatError, match="format version|format_version"):
        CheckpointConfig.from_dict(_minimal(format_version=version))


def test_newer_version_error_says_upgrade():
    with pytest.raises(UnsupportedFormatVersionError, match="version 3.*upgrade qformat"):
        CheckpointConfig.from_dict(_minimal(format_version=3))


def test_a_writer_records_the_lowest_version_that_holds_the_config():
    plain = CheckpointConfig.from_dict(_minimal())
    assert plain.format_version == 1 and "outlier_threshold" not in plain.to_dict()
    built = CheckpointConfig(schemes=plain.schemes, default_scheme=plain.default_scheme, outlier_threshold=6)
    assert built.format_version == 2 and built.to_dict()["outlier_threshold"] == 6.0
    assert CheckpointConfig.from_dict(built.to_dict()) == built
    assert CheckpointConfig(schemes=plain.schemes, default_scheme=plain.default_scheme).format_version == 1


@pytest.mark.parametrize("bad, match", [
    ({"outlier_threshold": 6.0}, "needs format_version 2"),  # a version-1 reader would drop it: refused
    ({"format_version": 2, "outlier_threshold": 0}, "positive finite"),
    ({"format_version": 2, "outlier_threshold": -1.5}, "positive finite"),
    ({"format_version": 2, "outlier_threshold": "6"}, "finite number"),
    ({"format_version": 2, "outlier_threshold": True}, "finite number"),
])
def test_outlier_threshold_is_checked(bad, match):
    with pytest.raises(FormatError, match=match):
        CheckpointConfig.from_dict(_minimal(**bad))


def test_version_2_without_a_threshold_is_read():
    assert CheckpointConfig.from_dict(_minimal(format_version=2)).outlier_threshold is None


@pytest.mark.parametrize("bad, match", [
    ({"quant_method": "compressed-tensors"}, "not a qformat checkpoint"),
    ({"default_scheme": "nope"}, "default_scheme 'nope'"),
    ({"overrides": [{"pattern": "re:(", "scheme": "w8a8-int8"}]}, "invalid regular expression"),
    ({"overrides": [{"pattern": "x", "scheme": "missing"}]}, "not defined"),
    ({"fallback": [{"module": "a", "reason": "whim"}]}, "reason"),
    ({"fallback": [{"module": "a", "reason": "user"}, {"module": "a", "reason": "user"}]}, "twice"),
    ({"schemes": {"w8a8-int8": {"weights": {"type": "int", "num_bits": 4, "strategy": "channel"}}}}, "8-bit"),
])
def test_invalid_configs_name_the_problem(bad, match):
    with pytest.raises(FormatError, match=match):
        CheckpointConfig.from_dict(_minimal(**bad))


def test_fused_groups_found_by_parent_and_table():
    names = ["m.l0.attn.q_proj", "m.l0.attn.k_proj", "m.l0.attn.v_proj", "m.l0.attn.o_proj", "m.l0.mlp.gate_proj",
             "m.l0.mlp.up_proj", "m.l0.mlp.down_proj", "m.l1.attn.q_proj"]
    groups = group_modules(names, fused_groups_for("llama"))
    assert groups == [("m.l0.attn.q_proj", "m.l0.attn.k_proj", "m.l0.attn.v_proj"),
                      ("m.l0.mlp.gate_proj", "m.l0.mlp.up_proj")]
    assert group_modules(["e.attention.self.query", "e.attention.self.key", "e.attention.self.value"],
                         fused_groups_for("xlm-roberta")) == [("e.attention.self.query", "e.attention.self.key",
                                                               "e.attention.self.value")]
    assert ("w1", "w3") in fused_groups_for("some-new-model")



def test_fused_mismatch_names_the_first_group_whose_members_differ():
    qkv, gate_up = ("a.q_proj", "a.k_proj", "a.v_proj"), ("b.gate_proj", "b.up_proj")
    int8, fp8 = BUILTIN_SCHEMES["w8a8-int8"], BUILTIN_SCHEMES["fp8-dynamic"]
    agree = {**dict.fromkeys(qkv, int8), **dict.fromkeys(gate_up, None)}
    assert fused_mismatch([qkv, gate_up], agree) is None
    assert fused_mismatch([qkv, gate_up], {**agree, "b.up_proj": fp8}) == gate_up  # kept next to quantized
    assert fused_mismatch([qkv, gate_up], {**agree, "a.v_proj": fp8, "b.up_proj": fp8}) == qkv  # first one wins
    assert fused_mismatch([qkv], {**agree, "a.k_proj": Scheme.from_dict(int8.to_dict())}) is None  # equal schemes

def test_layout_names_shapes_and_byte_formula():
    dense = module_tensors("m", BUILTIN_SCHEMES["w8a8-int8"], 64, 96)
    assert [(t.name, t.dtype, t.shape) for t in dense] == [("m.weight", "I8", (64, 96)), ("m.weight_scale", "F32", (64, 1))]
    _, sparse_fp8 = resolve_scheme_name("fp8-dynamic+2:4")
    sparse = module_tensors("m", sparse_fp8, 64, 96)
    assert [(t.name, t.dtype, t.shape) for t in sparse] == [
        ("m.compressed", "F8_E4M3", (64, 48)), ("m.bitmask", "U8", (64, 12)), ("m.shape", "I64", (2, 1)),
        ("m.weight_scale", "F32", (64, 1))]
    n, k = 4096, 4100  # K % 8 == 4: the bitmask rounds up
    assert quantized_nbytes(sparse_fp8, n, k) == n * k // 2 + n * -(-k // 8) + 16 + 4 * n
    assert quantized_nbytes(BUILTIN_SCHEMES["w8a16-int8"], n, k) == n * k + 4 * n



def test_suffix_roles_cover_every_stored_tensor():
    """The suffix lists readers and exporters import name exactly the tensors `module_tensors` gives each scheme."""
    assert sorted(WEIGHT_SUFFIXES) == sorted(DENSE_SUFFIXES + SPARSE_SUFFIXES + SCALE_SUFFIXES)
    static = Scheme(weights=QuantArgs(type="int", strategy="channel"),
                    input_activations=QuantArgs(type="int", strategy="tensor"))
    seen = set()
    for name, scheme in [(n, resolve_scheme_name(n)[1]) for n in scheme_names()] + [("static", static)]:
        tensors = module_tensors("m", scheme, 64, 64)
        suffixes = [t.name.removeprefix("m.") for t in tensors]
        values = SPARSE_SUFFIXES if scheme.sparsity else DENSE_SUFFIXES
        assert [s for s in suffixes if s not in SCALE_SUFFIXES] == list(values), name
        assert QUANTIZED_MARKER in suffixes, name
        assert tensors[0].dtype == VALUE_DTYPES[scheme.weights.type], name
        seen.update(suffixes)
    assert seen == set(WEIGHT_SUFFIXES)

def test_shape_rules():
    dense, sparse = BUILTIN_SCHEMES["w8a8-int8"], resolve_scheme_name("w8a8-int8+2:4")[1]
    assert shape_problem(dense, 64, 48) is None
    assert "in_features=40" in shape_problem(dense, 64, 40)
    assert "out_features=3" in shape_problem(dense, 3, 64)
    assert shape_problem(sparse, 64, 48) is not None and "multiples of 32" in shape_problem(sparse, 64, 48)
    assert shape_problem(sparse, 64, 64) is None
