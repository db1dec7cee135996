"""Untrusted safetensors headers and weight files: qformat refuses every header safetensors refuses (and accepts the
odd ones it accepts), caps the tensor count per file and per checkpoint, reads tensor bytes by offset from the header
it parsed once, and a weight file that shrinks while it is read is a one-line `FormatError`, never a SIGBUS.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import qformat
import qformat.io.safetensors_format as stf
from qformat.checkpoint import open_checkpoint
from qformat.errors import CorruptCheckpointError, FormatError
from qformat.io.safetensors_format import MAX_TENSORS_PER_FILE, read_header


def _write(path: Path, header: str, data: bytes = b"") -> Path:
    """A safetensors file with this exact header text (lone surrogates kept as they are written: escaped)."""
    raw = header.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _tensor(shape: str = "[0]", offsets: str = "[0,0]", dtype: str = '"U8"', extra: str = "") -> str:
    return f'{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}{extra}}}'


def _safetensors_keys(path: Path) -> tuple[list[str], dict | None]:
    with safe_open(path, framework="pt") as fh:
        return sorted(fh.keys()), fh.metadata()


U8x4 = '"a":' + _tensor("[4]", "[0,4]")

# Each header here is refused by safetensors (checked below, so the list stays true for the installed version).
REFUSED = {
    "__metadata__ is a list": (f'{{"__metadata__":[],{U8x4}}}', b"1234"),
    "__metadata__ is a string": (f'{{"__metadata__":"",{U8x4}}}', b"1234"),
    "__metadata__ is false": (f'{{"__metadata__":false,{U8x4}}}', b"1234"),
    "__metadata__ value not a string": (f'{{"__metadata__":{{"k":1}},{U8x4}}}', b"1234"),
    "__metadata__ twice": (f'{{"__metadata__":{{}},"__metadata__":{{}},{U8x4}}}', b"1234"),
    "shape is an object": ('{"a":' + _tensor("{}", "[0,1]") + "}", b"1"),
    "shape is a string": ('{"a":' + _tensor('"4"', "[0,4]") + "}", b"1234"),
    "shape is null": ('{"a":' + _tensor("null") + "}", b""),
    "dim is a bool": ('{"a":' + _tensor("[true]", "[0,1]") + "}", b"1"),
    "dim is a float": ('{"a":' + _tensor("[4.0]", "[0,4]") + "}", b"1234"),
    "dim is -0": ('{"a":' + _tensor("[-0]") + "}", b""),
    "dim is negative": ('{"a":' + _tensor("[-1,0]") + "}", b""),
    "zero-size tensor with a 1e20 dim": ('{"a":' + _tensor("[100000000000000000000,0]") + "}", b""),
    "zero-size tensor with a 1e20 float dim": ('{"a":' + _tensor("[1e20,0]") + "}", b""),
    "numel overflows before the zero dim": ('{"a":' + _tensor("[4294967296,4294967296,0]") + "}", b""),
    "offsets are bools": ('{"a":' + _tensor("[0]", "[false,false]") + "}", b""),
    "offset is -0": ('{"a":' + _tensor("[0]", "[-0,0]") + "}", b""),
    "three offsets": ('{"a":' + _tensor("[0]", "[0,0,0]") + "}", b""),
    "offsets are an object": ('{"a":' + _tensor("[0]", '{"b":0,"e":0}') + "}", b""),
    "dtype is a list": ('{"a":' + _tensor(dtype='["F32"]') + "}", b""),
    "dtype in lower case": ('{"a":' + _tensor(dtype='"u8"') + "}", b""),
    "tensor entry is null": ('{"a":null}', b""),
    "tensor entry lacks data_offsets": ('{"a":{"dtype":"U8","shape":[0]}}', b""),
    "duplicate dtype field": ('{"a":' + _tensor(extra=',"dtype":"U8"') + "}", b""),
    "lone high surrogate in a name": ('{"\\ud800":' + _tensor() + "}", b""),
    "lone low surrogate in a name": ('{"\\udc00":' + _tensor() + "}", b""),
    "lone surrogate in metadata": ('{"__metadata__":{"k":"\\ud800"},"a":' + _tensor() + "}", b""),
    "lone surrogate in an unknown field": ('{"a":' + _tensor(extra=',"x":"\\udfff"') + "}", b""),
    "NaN in an unknown field": ('{"a":' + _tensor(extra=',"x":NaN') + "}", b""),
    "1e400 in an unknown field": ('{"a":' + _tensor(extra=',"x":1e400') + "}", b""),
    "400-digit integer in an unknown field": ('{"a":' + _tensor(extra=',"x":' + "9" * 400) + "}", b""),
    "5000-digit integer in an unknown field": ('{"a":' + _tensor(extra=',"x":' + "9" * 5000) + "}", b""),
    "nesting 128 deep": ('{"a":' + _tensor(extra=',"x":' + "[" * 126 + "]" * 126) + "}", b""),
    "nesting 100000 deep": ('{"a":' + _tensor(extra=',"x":' + "[" * 100_000 + "]" * 100_000) + "}", b""),
    "header is a list": ("[]", b""),
    "header is null": ("null", b""),
    "byte-order mark": ("\ufeff{}", b""),
    "NUL padding": ("{}\0\0\0\0\0\0", b""),
    "second tensor overlaps": (f'{{{U8x4},"b":{_tensor("[2]", "[2,4]")}}}', b"1234"),
}

# Odd headers safetensors accepts: qformat accepts them too and reads the same tensors.
ACCEPTED = {
    "__metadata__ is null": (f'{{"__metadata__":null,{U8x4}}}', b"1234"),
    "duplicate metadata key": (f'{{"__metadata__":{{"k":"1","k":"2"}},{U8x4}}}', b"1234"),
    "unknown tensor fields": ('{"a":' + _tensor(extra=',"x":[1,{"y":null}],"z":' + "9" * 30) + "}", b""),
    "u64-max dim times zero": ('{"a":' + _tensor("[18446744073709551615,0]") + "}", b""),
    "zero first, then huge dims": ('{"a":' + _tensor("[0,4294967296,4294967296]") + "}", b""),
    "surrogate pair in a name": ('{"\\ud83d\\ude00":' + _tensor() + "}", b""),
    "nesting 127 deep": ('{"a":' + _tensor(extra=',"x":' + "[" * 125 + "]" * 125) + "}", b""),
    "empty header": ("{}", b""),
    "tab padding": ("{}\t\t\t\t\t\t", b""),
}


@pytest.mark.parametrize("name", REFUSED)
def test_headers_safetensors_refuses_are_refused(tmp_path, name):
    path = _write(tmp_path / "m.safetensors", *REFUSED[name])
    with pytest.raises(SafetensorError):
        _safetensors_keys(path)
    with pytest.raises(CorruptCheckpointError, match="is not a valid safetensors file") as caught:
        read_header(path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


@pytest.mark.parametrize("name", ACCEPTED)
def test_odd_headers_safetensors_accepts_are_accepted(tmp_path, name):
    path = _write(tmp_path / "m.safetensors", *ACCEPTED[name])
    keys, metadata = _safetensors_keys(path)
    header = read_header(path)
    assert sorted(header.tensors) == keys
    assert header.metadata == (metadata or {})


def test_a_refused_header_makes_verify_fail_with_one_line(good, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    data = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + n].decode().rstrip().replace('"__metadata__":{"format":"pt"}', '"__metadata__":[1]', 1)
    assert '"__metadata__":[1]' in text
    text += " " * (n - len(text))
    (folder / "model.safetensors").write_bytes(data[:8] + text.encode() + data[8 + n :])
    with pytest.raises(FormatError, match="__metadata__"):
        qformat.verify(folder)


# --- tensor count caps -------------------------------------------------------------------------------------------

def _zero_size_tensors(count: int) -> str:
    return "{" + ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(count)) + "}"


def test_tensor_count_per_file_is_capped(tmp_path):
    path = _write(tmp_path / "m.safetensors", _zero_size_tensors(MAX_TENSORS_PER_FILE + 1))
    with pytest.raises(CorruptCheckpointError, match=f"more than {MAX_TENSORS_PER_FILE:,} tensors"):
        read_header(path)


def test_tensor_count_at_the_cap_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(stf, "MAX_TENSORS_PER_FILE", 100)
    assert len(read_header(_write(tmp_path / "m.safetensors", _zero_size_tensors(100))).tensors) == 100
    with pytest.raises(CorruptCheckpointError, match="more than 100 tensors"):
        read_header(_write(tmp_path / "m.safetensors", _zero_size_tensors(101)))


def test_tensor_count_per_checkpoint_is_capped(good, monkeypatch):
    count = len(load_file(good / "model.safetensors"))
    monkeypatch.setattr(stf, "MAX_TENSORS_PER_CHECKPOINT", count)
    open_checkpoint(good)
    monkeypatch.setattr(stf, "MAX_TENSORS_PER_CHECKPOINT", count - 1)
    with pytest.raises(FormatError, match=f"more than {count - 1} tensors, qformat's limit per checkpoint"):
        open_checkpoint(good)


def test_index_entry_count_is_capped(good, tmp_path, monkeypatch):
    folder = tmp_path / "sharded"
    shutil.copytree(good, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    keys = list(load_file(folder / "model-00001-of-00001.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}
    index["weight_map"]["ghost.weight"] = "model-00001-of-00001.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    monkeypatch.setattr(stf, "MAX_TENSORS_PER_CHECKPOINT", len(keys))  # the weight file itself is within the limit
    with pytest.raises(FormatError, match=f"maps more than {len(keys)} tensors"):
        open_checkpoint(folder)


# --- reading tensors: each file parsed once, bytes read by offset ------------------------------------------------

@pytest.fixture(scope="module")
def good(tiny_models, tmp_path_factory) -> Path:
    return qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("headers") / "ckpt",
                           scheme="fp8-dynamic", overrides=["re:.*self_attn.*=w8a8-int8"]).output


def test_load_reads_every_tensor_exactly_as_safetensors(good):
    ckpt = open_checkpoint(good)
    reference = load_file(good / "model.safetensors")
    assert set(ckpt.tensors) == set(reference)
    for name, expected in reference.items():
        got = ckpt.load(name)
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_load_reads_zero_size_and_odd_dtypes(good, tmp_path):
    from safetensors.torch import save_file

    tensors = {"empty": torch.zeros(0, 3, dtype=torch.bfloat16), "flags": torch.tensor([True, False]),
               "h": torch.arange(6, dtype=torch.float16).reshape(2, 3), "big": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(good / "config.json", tmp_path / "config.json")
    ckpt = open_checkpoint(tmp_path)
    for name, expected in tensors.items():
        assert torch.equal(ckpt.load(name), expected)


def test_verify_parses_each_header_once_and_never_reopens_with_safetensors(good, monkeypatch):
    import safetensors

    import qformat.checkpoint.reader as reader

    parsed = []
    real = reader.read_header
    monkeypatch.setattr(reader, "read_header", lambda *a, **k: parsed.append(a[0]) or real(*a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open re-parses the whole header for each tensor")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    report = qformat.verify(good)
    assert report.hashes_checked > 0
    assert [p.name for p in parsed] == ["model.safetensors"]


# --- a weight file that shrinks while it is read ----------------------------------------------------------------

def _data_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_a_file_truncated_after_its_header_was_read_is_a_format_error(good, tmp_path, monkeypatch):
    verify_module = importlib.import_module("qformat.checkpoint.verify")  # the package's `verify` is the function

    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    weights = folder / "model.safetensors"

    def open_then_truncate(path):
        ckpt = open_checkpoint(path)
        os.truncate(weights, _data_start(weights) + 100)
        return ckpt

    monkeypatch.setattr(verify_module, "open_checkpoint", open_then_truncate)
    with pytest.raises(FormatError, match="changed while it was read") as caught:
        qformat.verify(folder)
    assert "\n" not in str(caught.value)


_SHRINK_WHILE_HASHING = textwrap.dedent("""
    import importlib, os, sys
    from concurrent.futures import ThreadPoolExecutor
    from qformat.cli.main import cli

    verify_module = importlib.import_module("qformat.checkpoint.verify")

    weights, data_start = sys.argv[2], int(sys.argv[3])

    class ShrinkingPool(ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            os.truncate(weights, data_start)  # the file shrinks once verify has opened it and starts hashing
            super().__init__(*args, **kwargs)

    verify_module.ThreadPoolExecutor = ShrinkingPool
    cli(["verify", sys.argv[1]], prog_name="qformat")
""")


def test_verify_does_not_die_by_a_signal_when_a_file_shrinks_while_hashing(good, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    weights = folder / "model.safetensors"
    result = subprocess.run([sys.executable, "-c", _SHRINK_WHILE_HASHING, str(folder), str(weights),
                             str(_data_start(weights))], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.count("\n") == 1 and "changed while it was read" in result.stderr
