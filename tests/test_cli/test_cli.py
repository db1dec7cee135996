"""The CLI in real subprocesses: its own behaviour, and every bad input it must refuse cleanly.

Each error test asserts: a non-zero exit, exactly one line on stderr (starting "qformat: error:"), no traceback
anywhere, SOURCE unchanged (digest of every file), and nothing left beside OUTPUT.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qformat.testing import save_random_llama


def qformat(*args: str, preexec_fn=None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qformat", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *, source: Path | None, before: str | None,
                         output: Path, digest, code: int = 2, words: str = "") -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qformat: error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert words in lines[0], lines[0]
    if source is not None:
        assert digest(source) == before
    assert not output.exists()
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")] == []
    return lines[0]


@pytest.fixture
def src(tiny_models, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "src"))


@pytest.fixture
def out(tmp_path) -> Path:
    (tmp_path / "outputs").mkdir()
    return tmp_path / "outputs" / "out"


def test_convert_inspect_verify(src, out):
    result = qformat("convert", src, out, "--scheme", "w8a8-int8", "--override", "re:.*mlp.*=fp8-dynamic",
                     "--ignore", "model.layers.0.self_attn.o_proj")
    assert result.returncode == 0, result.stderr
    assert "13/15 Linear quantized (7 w8a8-int8, 6 fp8-dynamic)" in result.stdout
    assert result.stderr == ""
    verified = qformat("verify", out)
    assert verified.returncode == 0 and verified.stdout.startswith(f"ok: {out} follows qformat format v1")
    assert "15 Linear modules: 13 quantized, 2 in full precision" in verified.stdout
    summary = json.loads(qformat("inspect", "--json", out).stdout)
    assert summary["quantized_modules"] == 13 and summary["fallback_by_reason"] == {"default": 1, "user": 1}


def test_verify_failure_names_the_problem(src, out, tmp_path):
    assert qformat("convert", src, out).returncode == 0
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight_scale"] *= -1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    result = qformat("verify", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("qformat: error: model.layers.1.mlp.up_proj.weight_scale: scales must be finite "
                                     "and positive, and small enough that every dequantized value is finite")


def test_existing_output_needs_overwrite_and_is_replaced_only_when_done(src, out):
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = qformat("convert", src, out)
    assert result.returncode == 2 and result.stderr.strip().endswith("pass --overwrite to replace it")
    assert (out / "keep.txt").read_text() == "old"
    assert qformat("convert", src, out, "--overwrite").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _garbage_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 64) + b"{" + b"\x00" * 63 + data[72:])


def _nan(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _index_outside(folder: Path) -> None:
    keys = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(keys, "model-00001-of-00001.safetensors")
    weight_map[keys[0]] = "../../elsewhere/model.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _unknown_arch(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qformat-no-such-arch"
    (folder / "config.json").write_text(json.dumps(config))


def _not_a_model(folder: Path) -> None:
    (folder / "config.json").unlink()


@pytest.mark.parametrize("damage, words", [
    (_truncate, "is not a valid safetensors file: tensor data ends at byte"),
    (_garbage_header, "header is not valid JSON"),
    (_nan, "model.layers.1.self_attn.v_proj.weight holds NaN or Inf (first in row 3)"),
    (_index_outside, "lies outside the model folder"),
    (_unknown_arch, "does not know model_type 'qformat-no-such-arch'"),
    (_not_a_model, "is not a Hugging Face model folder: it has no config.json"),
])
def test_bad_sources_fail_cleanly(src, out, digest, damage, words):
    damage(src)
    before = digest(src)
    assert_clean_failure(qformat("convert", src, out), source=src, before=before, output=out, digest=digest, words=words)


def test_missing_source(out, tmp_path, digest):
    assert_clean_failure(qformat("convert", tmp_path / "no-such-model", out), source=None, before=None, output=out,
                         digest=digest, words="does not exist")


def test_bad_options_fail_cleanly(src, out, digest):
    before = digest(src)
    assert_clean_failure(qformat("convert", src, out, "--scheme", "int3"), source=src, before=before, output=out,
                         digest=digest, words="unknown scheme 'int3'")
    assert_clean_failure(qformat("convert", src, out, "--override", "re:(=fp8-dynamic"), source=src, before=before,
                         output=out, digest=digest, words="invalid regular expression")


def test_output_inside_source_is_refused(src, digest):
    before = digest(src)
    inside = src / "quantized"
    result = qformat("convert", src, inside)
    assert_clean_failure(result, source=src, before=before, output=inside, digest=digest, words="lies inside SOURCE")


def test_full_disk_is_reported_and_leaves_nothing(src, out, digest):
    before = digest(src)

    def limit() -> None:  # the output shard (~210 kB) cannot be written under a 64 kB file-size limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = qformat("convert", src, out, preexec_fn=limit)
    assert_clean_failure(result, source=src, before=before, output=out, digest=digest,
                         words="file size limit was reached")


@pytest.fixture(scope="module")
def larger_model(tmp_path_factory) -> Path:
    """A ~60 MB Llama whose fp8 conversion (MSE observer) takes a few seconds: long enough to interrupt."""
    return save_random_llama(tmp_path_factory.mktemp("larger") / "llama", hidden_size=384, num_layers=6, vocab_size=4096)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_way_leaves_nothing(larger_model, out, digest, sig):
    before = digest(larger_model)
    # a test run started in the background inherits SIGINT ignored (as every background job does), and Python then
    # honours that; the child gets the default disposition back, as a convert run from a terminal has it
    proc = subprocess.Popen([sys.executable, "-m", "qformat", "convert", str(larger_model), str(out), "--scheme",
                             "fp8-dynamic"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    shard = None
    while time.monotonic() < deadline and proc.poll() is None:  # wait until it is writing tensors
        temps = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.qformat-tmp-")]
        if temps and (temps[0] / "model.safetensors").exists():
            shard = temps[0] / "model.safetensors"
            break
        time.sleep(0.01)
    assert shard is not None, "the conversion finished or failed before it could be interrupted"
    # signal at once: the shard is being written (the write phase lasts ~0.6 s here)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_clean_failure(result, source=larger_model, before=before, output=out, digest=digest, code=130,
                         words="interrupted; nothing was written to OUTPUT")
    assert os.listdir(out.parent) == []


def test_help_lists_commands_and_schemes():
    result = qformat("convert", "--help")
    assert result.returncode == 0
    for word in ("--scheme", "w8a8-int8", "fp8-dynamic+2:4", "--override", "--ignore", "--sparsity", "--base-model"):
        assert word in result.stdout
