"""The committed golden checkpoints pin the format: converting the committed source again must give the same
header bytes, the same tensor bytes and the same config (volatile fields excepted). Tests never regenerate them;
tests/golden/make_golden.py does, on purpose only."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

import qformat

GOLDEN = Path(__file__).parent / "golden"
SOURCE = GOLDEN / "source"

#: Fields that legitimately differ between runs: the library version and the versions of torch & co.
VOLATILE = (("provenance", "qformat_version"), ("provenance", "environment"))
#: Floats compared with a tolerance: the error statistics sum in fp32, whose order may differ across CPUs.
TOLERANT = ("statistics",)


def _options(name: str) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GOLDEN[name]


def _header(path: Path) -> bytes:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[: 8 + n]


def _strip(qc: dict) -> dict:
    qc = json.loads(json.dumps(qc))
    for section, key in VOLATILE:
        qc[section].pop(key)
    for section in TOLERANT:
        qc.pop(section)
    return qc


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9)
    return a == b


@pytest.mark.parametrize("name", ["mixed", "sparse24"])
def test_conversion_reproduces_the_golden_checkpoint(tmp_path, name):
    out = tmp_path / name
    qformat.convert(SOURCE, out, **_options(name))
    golden = GOLDEN / name
    assert _header(out / "model.safetensors") == _header(golden / "model.safetensors")
    assert (out / "model.safetensors").read_bytes() == (golden / "model.safetensors").read_bytes()
    ours = json.loads((out / "config.json").read_text())
    theirs = json.loads((golden / "config.json").read_text())
    qc_ours, qc_theirs = ours.pop("quantization_config"), theirs.pop("quantization_config")
    assert ours == theirs  # the source config is carried over unchanged
    assert _strip(qc_ours) == _strip(qc_theirs)
    assert _close(qc_ours["statistics"], qc_theirs["statistics"])
    assert (out / "generation_config.json").read_bytes() == (golden / "generation_config.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in golden.iterdir())


@pytest.mark.parametrize("name", ["mixed", "sparse24"])
def test_committed_golden_checkpoints_verify(name):
    report = qformat.verify(GOLDEN / name)
    assert report.hashes_checked == report.tensors and report.linear_modules == 8


def test_golden_pins_the_documented_layout():
    header = json.loads(_header(GOLDEN / "sparse24" / "model.safetensors")[8:])
    up = "model.layers.0.mlp.up_proj"
    assert header[f"{up}.compressed"]["dtype"] == "I8" and header[f"{up}.compressed"]["shape"] == [64, 16]
    assert header[f"{up}.bitmask"]["dtype"] == "U8" and header[f"{up}.bitmask"]["shape"] == [64, 4]
    assert header[f"{up}.shape"]["dtype"] == "I64" and header[f"{up}.shape"]["shape"] == [2, 1]
    assert header[f"{up}.weight_scale"] == {**header[f"{up}.weight_scale"], "dtype": "F32", "shape": [64, 1]}
    assert header["__metadata__"] == {"format": "pt"}
    qc = json.loads((GOLDEN / "sparse24" / "config.json").read_text())["quantization_config"]
    assert [(e["module"], e["reason"]) for e in qc["fallback"]] == [
        ("lm_head", "default"), ("model.layers.0.self_attn.k_proj", "shape"), ("model.layers.0.self_attn.q_proj", "fused"),
        ("model.layers.0.self_attn.v_proj", "shape")]
