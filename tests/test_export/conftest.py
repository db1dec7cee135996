"""Shared pieces of the export/import tests: converted tiny checkpoints and the independent judges.

The judges are compressed-tensors and transformers themselves: transformers' `CompressedTensorsConfig(dequantize=True)`
load of a compressed-tensors checkpoint, and compressed-tensors' `CompressedTensorsDequantizer`. qformat's side is its
own dequantized load (`QFormatConfig(dequantize=True)`) and `dequantized_state_dict`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qformat

INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 7, 100, 64, 3]])


@pytest.fixture(scope="session")
def converted(tiny_models, tmp_path_factory):
    """qformat checkpoints of the tiny Llama, one per scheme, converted once."""
    root = tmp_path_factory.mktemp("export-sources")

    @functools.cache
    def get(scheme: str) -> Path:
        out = root / scheme.replace(":", "")
        return qformat.convert(tiny_models["llama"], out, scheme=scheme, base_model="qformat-test/tiny-llama").output

    return get


def ct_logits(folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of transformers' own compressed-tensors load, dequantized.

    transformers 5.17 leaves compressed-tensors' fake quantization of the input activations wrapped around each
    dequantized Linear (5.23 removes it); it is switched off here so that both versions judge the weights alone.
    """
    from compressed_tensors.quantization import disable_quantization
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                 dtype=dtype)
    model.apply(disable_quantization)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def qformat_logits(folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of qformat's dequantized load (plain nn.Linear layers holding scale * values)."""
    from transformers import AutoModelForCausalLM

    from qformat import QFormatConfig

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=QFormatConfig(dequantize=True),
                                                 dtype=dtype)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def ct_dequantized(folder: Path, *, ignore: tuple[str, ...] = (), validate: bool = True) -> dict[str, torch.Tensor]:
    """compressed-tensors' `CompressedTensorsDequantizer` applied to the checkpoint's tensors, in float32.

    `validate` also has it check that no quantization parameter is left over. Its matching works on tensor names only,
    so a checkpoint whose config targets the class name `Linear` needs its non-Linear weights named in `ignore`.
    """
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    judge = CompressedTensorsDequantizer(str(folder), ignore=list(ignore), dtype=torch.float32)
    return judge.validate(tensors) if validate else judge.process(tensors)


def tensor_table(folder: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (dtype, shape, sha256 of the bytes) for every tensor of the checkpoint."""
    table = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name).contiguous()
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                table[name] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest())
    return table


def quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="session")
def judge():
    """The helpers above, for test modules (conftest modules cannot be imported under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(ct_logits=ct_logits, qformat_logits=qformat_logits, ct_dequantized=ct_dequantized,
                           tensor_table=tensor_table, quantization_config=quantization_config, input_ids=INPUT_IDS)
