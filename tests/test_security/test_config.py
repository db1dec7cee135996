"""Malformed config.json data is one `FormatError` naming the key, never an internal error or a silent misreading.

Every case mutates a converted tiny checkpoint's config.json and runs it through `qformat.verify`, `qformat.inspect`
and `qformat card` (in-process): each must refuse it with a `QFormatError` (exit code 2 for the CLI).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import qformat
from qformat.cli.main import cli
from qformat.errors import FormatError, QFormatError
from qformat.io.jsonfile import JSON_MAX_DEPTH, load_json
from qformat.spec.config import CheckpointConfig

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory) -> Path:
    """A w8a8-int8 tiny Llama (dynamic activations) with lm_head kept: schemes, fallback and statistics to mutate."""
    out = tmp_path_factory.mktemp("config-cases") / "ckpt"
    qformat.convert(tiny_models["llama"], out, scheme="w8a8-int8", overrides=["re:.*down_proj=w8a16-int8"])
    return out


def _qc(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda config: edit(config["quantization_config"])


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set `value` at a dotted path below config.json's root (list indexes as integers)."""
    def edit(config: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


W = "quantization_config.schemes.w8a8-int8.weights"
A = "quantization_config.schemes.w8a8-int8.input_activations"
P = "quantization_config.provenance"
S = "quantization_config.statistics"

# (config edit, expected message fragment)
CONFIG_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "symmetric string": (_set(f"{W}.symmetric", "false"), "symmetric must be true or false"),
    "dynamic string": (_set(f"{A}.dynamic", "false"), "dynamic must be true or false"),
    "tensor strategy dynamic": (_set(f"{A}.strategy", "tensor"), "per-tensor activation quantization must be static"),
    "num_bits float": (_set(f"{W}.num_bits", 8.0), "num_bits must be an integer"),
    "type list": (_set(f"{W}.type", ["int"]), "weights.type must be a string"),
    "weights list": (_set(f"{W}", ["int"]), "weights must be an object"),
    "activations string": (_set(f"{A}", "dynamic"), "input_activations must be an object"),
    "sparsity number": (_set("quantization_config.schemes.w8a8-int8.sparsity", 24), "sparsity must be a string"),
    "format_version bool": (_set("quantization_config.format_version", True), "format_version must be an integer"),
    "fused_groups string": (_set("quantization_config.fused_groups", "qkv"), "fused_groups must be a list"),
    "fused_groups numbers": (_set("quantization_config.fused_groups", [[1, 2]]), r"fused_groups\[0\]\[0\]"),
    "fused_groups object": (_set("quantization_config.fused_groups", {"a": 1}), "fused_groups must be a list"),
    "provenance list": (_set(P, []), "provenance must be an object"),
    "provenance source string": (_set(f"{P}.source", "hub"), "provenance.source must be an object"),
    "base_model number": (_set(f"{P}.source.base_model", 7), "source.base_model must be a string"),
    "source bytes string": (_set(f"{P}.source.bytes", "12"), "source.bytes must be an integer"),
    "tensor_hashes list": (_set(f"{P}.tensor_hashes", ["sha256:00"]), "tensor_hashes must be an object"),
    "tensor_hash number": (_set(f"{P}.tensor_hashes", {"lm_head.weight": 5}), "tensor_hashes"),
    "environment list": (_set(f"{P}.environment", ["torch"]), "environment must be an object"),
    "command number": (_set(f"{P}.command", 5), "provenance.command must be a string"),
    "imported_from string": (_set(f"{P}.imported_from", "ct"), "imported_from must be an object"),
    "statistics list": (_set(S, []), "statistics must be an object"),
    "statistics modules list": (_set(f"{S}.modules", []), "statistics.modules must be an object"),
    "statistics module number": (_set(f"{S}.modules", {Q: 5}), "must be an object"),
    "linear_modules string": (_set(f"{S}.linear_modules", "13"), "linear_modules must be an integer"),
    "linear_modules bool": (_set(f"{S}.linear_modules", True), "linear_modules must be an integer"),
    "rel_error string": (_set(f"{S}.modules", {Q: {"rel_error": "small"}}), "rel_error must be a finite number"),
    "fallback object": (_set("quantization_config.fallback", {"lm_head": "user"}), "fallback must be a list"),
    "fallback number": (_set("quantization_config.fallback", [5]), "needs 'module' and 'reason'"),
    "fallback detail": (_set("quantization_config.fallback.0.detail", 5), r"fallback\[0\].detail must be a string"),
    "fallback measured": (_set("quantization_config.fallback.0.measured", "x"), "measured must be an object"),
    "fallback reason": (_set("quantization_config.fallback.0.reason", ["user"]), "reason must be a string"),
    "overrides object": (_set("quantization_config.overrides", {"re:.*": "w8a8-int8"}), "overrides must be a list"),
    "override pattern": (_set("quantization_config.overrides", [{"pattern": 5, "scheme": "w8a8-int8"}]), "pattern"),
    "evaluation object": (_set("quantization_config.evaluation", {}), "evaluation must be a list"),
    "fallback_search list": (_set("quantization_config.fallback_search", []), "fallback_search must be an object"),
    "architectures string": (_set("architectures", "LlamaForCausalLM"), "architectures must be a list"),
    "architectures numbers": (_set("architectures", [5]), r"architectures\[0\] must be a string"),
    "model_type number": (_set("model_type", 5), "model_type must be a string"),
    "dtype list": (_set("dtype", ["F32"]), "dtype must be a string"),
}

# Raw config.json texts the JSON reader must refuse: (text builder, message fragment).
RAW_CASES: dict[str, tuple[Callable[[str], str], str]] = {
    "deep nesting": (lambda t: t[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "deeper than"),
    "huge integer": (lambda t: t[:-1] + ', "x": ' + "9" * 5000 + "}", "JSON readers refuse"),
    "NaN literal": (lambda t: t[:-1] + ', "x": NaN}', "NaN"),
    "infinite float": (lambda t: t[:-1] + ', "x": 1e400}', "not finite"),
    "lone surrogate": (lambda t: t[:-1] + ', "x": "\\ud800"}', "surrogate"),
    "not utf-8": (lambda t: t[:-1] + ', "x": "\xff"}', "not UTF-8"),
    "truncated": (lambda t: t[: len(t) // 2], "not valid JSON"),
}


def _copy(converted: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "case"
    shutil.copytree(converted, folder)
    return folder


def _mutated(converted: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    folder = _copy(converted, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _raw(converted: Path, tmp_path: Path, build: Callable[[str], str]) -> Path:
    folder = _copy(converted, tmp_path)
    text = json.dumps(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_bytes(build(text).encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff"))
    return folder


def _refused_everywhere(folder: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        qformat.verify(folder)
    with pytest.raises(QFormatError, match=match):
        qformat.inspect(folder)
    result = CliRunner().invoke(cli, ["card", str(folder)])
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_config_value_of_the_wrong_type_is_a_format_error(converted, tmp_path, case):
    edit, match = CONFIG_CASES[case]
    _refused_everywhere(_mutated(converted, tmp_path, edit), match)


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_config_json_that_json_chokes_on_is_a_format_error(converted, tmp_path, case):
    build, match = RAW_CASES[case]
    _refused_everywhere(_raw(converted, tmp_path, build), match)


def test_the_json_reader_refuses_what_is_not_a_regular_file(tmp_path):
    import os

    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        load_json(fifo)
    (tmp_path / "ok.json").write_text("[" * JSON_MAX_DEPTH + "]" * JSON_MAX_DEPTH)
    assert load_json(tmp_path / "ok.json") is not None
    (tmp_path / "deep.json").write_text("[" * (JSON_MAX_DEPTH + 1) + "]" * (JSON_MAX_DEPTH + 1))
    with pytest.raises(FormatError, match="deeper than"):
        load_json(tmp_path / "deep.json")


def test_the_strict_parser_still_reads_every_scheme_it_writes(converted):
    config = json.loads((converted / "config.json").read_text())["quantization_config"]
    assert CheckpointConfig.from_dict(config).to_dict() == {**config, "quant_method": "qformat"}


# -- config.json against the weights: what transformers cannot load fails verify -----------------------------------

STRUCTURE_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "oversized architecture": (_set("num_hidden_layers", 100_000),
                               "config.json says num_hidden_layers=100000 but the weights hold 2 layers"),
    "nested layer count": (_set("text_config", {"num_hidden_layers": 10**9}), "text_config.num_hidden_layers"),
    "more layers than stored": (_set("num_hidden_layers", 4), "builds 4 numbered layers but the weights hold 2"),
    "sizes disagree": (_set("intermediate_size", 256),
                       r"is \[\d+, \d+\] in the weights but config.json makes it \[\d+, \d+\]"),
    "heads do not divide": (_set("num_attention_heads", 3), r"not a multiple of the number of attention heads \(3\)"),
    "unknown model_type": (_set("model_type", "not-a-model"), "transformers cannot load this checkpoint"),
}


@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
def test_verify_refuses_a_config_transformers_cannot_load_with_these_weights(converted, tmp_path, case):
    edit, match = STRUCTURE_CASES[case]
    folder = _mutated(converted, tmp_path, edit)
    with pytest.raises(FormatError, match=match):
        qformat.verify(folder, check_hashes=False)
    result = CliRunner().invoke(cli, ["verify", str(folder)])
    assert result.exit_code == 2 and "internal error" not in result.output, result.output


def test_verify_refuses_a_bias_the_linear_module_does_not_have(converted, tmp_path):
    folder = _copy(converted, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors[f"{Q}.bias"] = tensors["model.norm.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match=rf"{Q}.bias: LlamaForCausalLM has no such tensor"):
        qformat.verify(folder, check_hashes=False)


# -- `qformat import` of a compressed-tensors checkpoint with a malformed config ----------------------------------

CT_CASES: dict[str, Callable[[dict[str, Any]], None]] = {
    "ignore string": _set("quantization_config.ignore", "lm_head"),
    "ignore numbers": _set("quantization_config.ignore", [5]),
    "targets string": _set("quantization_config.config_groups.group_0.targets", "Linear"),
    "group string": _set("quantization_config.config_groups.group_0", "W8A8"),
    "group_size string": _set("quantization_config.config_groups.group_0.weights.group_size", "128"),
    "config_groups list": _set("quantization_config.config_groups", [1]),
    "version number": _set("quantization_config.version", 17),
    "sparsity format list": _set("quantization_config.sparsity_config", {"format": ["dense"]}),
    "note fallback object": _set("quantization_config.qformat", {"fallback": {"lm_head": "user"}}),
    "note fallback entry": _set("quantization_config.qformat", {"fallback": [{"module": "lm_head", "reason": 5}]}),
    "hostile ignore": _set("quantization_config.ignore", [r"re:(\w|\w\w|_|\.)+$x"]),
}


@pytest.fixture(scope="module")
def ct_source(tmp_path_factory) -> Path:
    from qformat.testing.ct_checkpoints import save_ct_checkpoint

    return save_ct_checkpoint(tmp_path_factory.mktemp("ct-source") / "w8a8", {"group_0": ("W8A8", ["Linear"])})


@pytest.mark.parametrize("case", list(CT_CASES))
def test_import_of_a_malformed_compressed_tensors_config_is_one_error(ct_source, tmp_path, case):
    folder = _mutated(ct_source, tmp_path, CT_CASES[case])
    with pytest.raises(QFormatError):
        qformat.import_compressed_tensors(folder, tmp_path / "out")
    result = CliRunner().invoke(cli, ["import", str(folder), str(tmp_path / "out2")])
    assert result.exit_code == 2 and "internal error" not in result.output, result.output


# -- the same config/weights checks guard `convert`: a source transformers would misload is refused ---------------

SOURCE_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "oversized architecture": (_set("num_hidden_layers", 100_000), "num_hidden_layers=100000 but the weights hold 2"),
    "sizes disagree": (_set("intermediate_size", 256), "in the weights but config.json makes it"),
    "deep nesting": (_set("x", json.loads("[" * 200 + "]" * 200)), "deeper than"),
}


@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_convert_refuses_a_source_whose_config_disagrees_with_its_weights(tiny_models, tmp_path, case):
    edit, match = SOURCE_CASES[case]
    source = tmp_path / "source"
    shutil.copytree(tiny_models["llama"], source)
    config = json.loads((source / "config.json").read_text())
    edit(config)
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(QFormatError, match=match):
        qformat.convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_full_precision_parameter_stored_as_an_integer_is_refused(tiny_models, tmp_path):
    """An F32 LayerNorm weight rewritten as I32 (same width, so a recomputed hash matches) must not verify:
    transformers would cast the integers into the float parameter and load a wrong model."""
    import torch

    ckpt = qformat.convert(tiny_models["llama"], tmp_path / "ckpt", scheme="w8a8-int8").output
    tensors = load_file(ckpt / "model.safetensors")
    name = next(n for n in tensors if n.endswith("norm.weight"))
    tensors[name] = tensors[name].view(torch.int32)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]["provenance"]["tensor_hashes"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(qformat.FormatError, match=f"{name} is stored as I32, but it is a full-precision parameter"):
        qformat.verify(ckpt)


@pytest.mark.parametrize("metadata", [1.5, [1, [2]], "x", None])
def test_an_index_whose_metadata_is_not_an_object_is_refused(tmp_path, metadata):
    from qformat.io.index import read_weight_index

    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": metadata, "weight_map": {"a.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(qformat.CorruptCheckpointError, match="'metadata' must be a JSON object"):
        read_weight_index(tmp_path, "model.safetensors.index.json")
