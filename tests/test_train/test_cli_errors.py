"""`qformat distill` on bad input: one line, exit 2, nothing written (in-process CliRunner)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import qformat
from qformat.cli.main import cli

FAST = ["--steps", "2", "--batch-size", "2", "--seq-len", "16"]


def _fails(args: list[str], words: str, out) -> str:
    result = CliRunner().invoke(cli, ["distill", *map(str, args)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qformat: error: "), result.output
    assert words in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"\xff\xfe not utf-8 \x00", "is not UTF-8 text"),
    (b"short text", "fewer than one batch"),
])
def test_a_bad_data_file(peaked_llama, tmp_path, content, words):
    data = tmp_path / "train.txt"
    data.write_bytes(content)
    _fails([peaked_llama, tmp_path / "out", "--data", data, *FAST], words, tmp_path / "out")


def test_missing_data_and_a_bad_jsonl(peaked_llama, tmp_path):
    _fails([peaked_llama, tmp_path / "out", "--data", tmp_path / "nope.txt", *FAST], "cannot be read", tmp_path / "out")
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "fine"}\n{"label": 1}\n')
    _fails([peaked_llama, tmp_path / "out", "--data", bad, *FAST], 'line 2 has no "text"', tmp_path / "out")


def test_an_unknown_scheme_and_bad_options(peaked_llama, tmp_path):
    out = tmp_path / "out"
    _fails([peaked_llama, out, "--data", "calibration", "--scheme", "w3a3-int3", *FAST], "w3a3-int3", out)
    _fails([peaked_llama, out, "--data", "calibration", "--noise-rate", "0", *FAST], "--noise-rate", out)
    _fails([peaked_llama, out, "--data", "calibration", "--loss-weights", "kd=1", *FAST], "--loss-weights", out)
    _fails([peaked_llama, out, "--data", "calibration", "--loss-weights", "task=0,output=0,attention=0", *FAST],
           "every loss weight is 0", out)
    _fails([peaked_llama, out, "--data", "calibration", "--save-every", "1", *FAST], "--state-dir", out)
    _fails([peaked_llama, out, "--data", "calibration", "--resume", tmp_path / "none", *FAST], "no such folder", out)


def test_a_source_that_is_already_quantized(peaked_llama, tmp_path):
    quantized = qformat.convert(peaked_llama, tmp_path / "int8", scheme="w8a8-int8").output
    _fails([quantized, tmp_path / "out", "--data", "calibration", *FAST], "already quantized", tmp_path / "out")


def test_a_tampered_state_is_refused(peaked_llama, tmp_path):
    state = tmp_path / "state"
    qformat.distill(peaked_llama, tmp_path / "a", data="calibration", steps=2, batch_size=2, seq_len=16,
                    save_every=1, state_dir=state)
    (state / "step-0000001" / "student.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _fails([peaked_llama, tmp_path / "out", "--data", "calibration", "--resume", state, *FAST[:0], "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--save-every", "1"], "malformed safetensors", tmp_path / "out")


def test_the_cli_trains_and_reports(peaked_llama, tmp_path):
    result = CliRunner().invoke(cli, ["distill", str(peaked_llama), str(tmp_path / "out"), "--data", "calibration",
                                      *FAST, "--eval-text", "heldout", "--eval-tokens", "256"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and "final losses: output" in result.output
    assert "perplexity on pydoc-topics/heldout: source" in result.output
    qformat.verify(tmp_path / "out")


def test_a_bad_device(peaked_llama, tmp_path):
    out = tmp_path / "out"
    _fails([peaked_llama, out, "--data", "calibration", "--device", "tpu", *FAST], "--device", out)
    if not torch.cuda.is_available():
        _fails([peaked_llama, out, "--data", "calibration", "--device", "cuda", *FAST], "no CUDA device", out)
