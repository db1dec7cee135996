"""vLLM itself as a judge of the export.

vLLM 0.33 pins torch 2.14 and compressed-tensors 0.17, so it lives in its own environment: set QFORMAT_VLLM_PYTHON to
that environment's interpreter (or run the tests where `import vllm` works). `vllm_judge.py` runs there, on CPU: vLLM's
own `CompressedTensorsConfig` parses the export's config, picks each layer's scheme (fused q/k/v and gate/up layers
included) and creates the layer's weights, which must be exactly the checkpoint's tensors. Without vLLM these tests
are skipped; the generation test also needs a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qformat

pytestmark = pytest.mark.vllm

JUDGE = Path(__file__).with_name("vllm_judge.py")

#: scheme -> the vLLM scheme class every quantized layer must get (on a capability 9.0 GPU)
EXPECTED = {
    "w8a8-int8": "CompressedTensorsW8A8Int8",
    "w8a16-int8": "CompressedTensorsWNA16",
    "fp8-dynamic": "CompressedTensorsW8A8Fp8",
    "fp8-weight-only": "CompressedTensorsW8A16Fp8",
    "fp8-dynamic+2:4": "CompressedTensorsW8A8Fp8",
    "w8a16-int8+2:4": "CompressedTensorsWNA16",
}


def _vllm_python() -> str | None:
    configured = os.environ.get("QFORMAT_VLLM_PYTHON")
    if configured:
        return configured if shutil.which(configured) or Path(configured).is_file() else None
    try:
        import vllm  # noqa: F401
    except ImportError:
        return None
    return sys.executable


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed here; set QFORMAT_VLLM_PYTHON to an interpreter that has it")
    return python


def judge(python: str, folder: Path, capability: str = "9.0") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([python, str(JUDGE), str(folder), "--capability", capability], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("scheme", list(EXPECTED))
def test_vllm_parses_the_export_and_picks_the_scheme_for_every_layer(vllm_python, converted, tmp_path, scheme):
    out = qformat.export_compressed_tensors(converted(scheme), tmp_path / "out").output
    verdict = judge(vllm_python, out)
    assert verdict["ok"], verdict["error"]
    layers = {name: s for name, s in verdict["schemes"].items() if name.rsplit(".", 1)[-1].endswith("_proj")}
    assert len(layers) == 14 and set(layers.values()) == {EXPECTED[scheme]}
    assert verdict["schemes"]["lm_head"] is None  # kept in full precision, as vLLM requires
    assert set(verdict["fused_schemes"].values()) == {EXPECTED[scheme]} and len(verdict["fused_schemes"]) == 4
    assert not verdict.get("tensor_problems")


def test_vllm_refuses_what_qformat_refuses(vllm_python, converted, tmp_path):
    """A compressed-tensors config that leaves k_proj out of its fused group: vLLM fails, as qformat's export does."""
    out = qformat.export_compressed_tensors(converted("w8a8-int8"), tmp_path / "out").output
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["ignore"].append("model.layers.0.self_attn.k_proj")
    (out / "config.json").write_text(json.dumps(config))
    verdict = judge(vllm_python, out)
    assert not verdict["ok"] and "qkv_proj" in json.dumps(verdict["layer_errors"])


@pytest.mark.cuda
def test_vllm_generates_from_the_export(vllm_python, converted, tmp_path):
    if vllm_python != sys.executable:
        pytest.skip("generation needs vLLM and a GPU in this interpreter")
    from vllm import LLM, SamplingParams

    out = qformat.export_compressed_tensors(converted("fp8-dynamic"), tmp_path / "out").output
    llm = LLM(model=str(out), tokenizer=None, skip_tokenizer_init=True, enforce_eager=True, max_model_len=64)
    result = llm.generate([{"prompt_token_ids": [1, 5, 9, 17]}], SamplingParams(max_tokens=8, temperature=0))
    assert len(result[0].outputs[0].token_ids) == 8
