"""Tiny models with a byte-level tokenizer (vocabulary 256, as the tiny models'), so they read real text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qformat.testing import build_tiny_model
from qformat.testing.tiny_models import save_byte_tokenizer, save_tiny_model


def _with_tokenizer(folder: Path) -> Path:
    save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def readable(tmp_path_factory: pytest.TempPathFactory):
    """arch -> a saved tiny model of `arch` with a byte tokenizer (made once per session on first use)."""
    root = tmp_path_factory.mktemp("readable")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = _with_tokenizer(save_tiny_model(arch, root / arch))
        return made[arch]

    return get


def damaged_llama(folder: Path, module: str, *, seed: int = 0) -> Path:
    """The tiny Llama with one module made fragile to quantization: its first input column is 100x the other
    weights, so each row's int8 scale is set by that column and every other weight of the row rounds to zero.
    The full-precision model is still an ordinary model (the column is part of it)."""
    model = build_tiny_model("llama", seed=seed)
    with torch.no_grad():
        weight = model.get_submodule(module).weight
        weight[:, 0] = 100 * weight.abs().max()
        model.lm_head.weight *= 5  # peaked predictions: a random model's are near uniform, which hides any damage
    model.save_pretrained(folder)
    return _with_tokenizer(folder)


@pytest.fixture
def quantized_copy(tmp_path: Path):
    def copy(folder: Path) -> Path:
        out = tmp_path / (folder.name + "-copy")
        shutil.copytree(folder, out)
        return out

    return copy
