"""Shared pieces of the SmoothQuant tests: a byte-level tokenizer, tiny models with planted activation outliers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qformat.testing.tiny_models import build_tiny_model, save_byte_tokenizer

#: How much the planted outlier channels are amplified: far beyond what int8 per-token scales absorb.
OUTLIER = 30.0


def plant_outliers(model: torch.nn.Module) -> torch.nn.Module:
    """Amplify every 8th output channel of each block's norms, v_proj and up_proj/fc1 by `OUTLIER`: the Linear
    inputs after them get channel outliers (as trained LLMs have), so SmoothQuant's factors are far from 1 and a
    wrong fold would show in the outputs. (Gemma's norms store w - 1: they are left alone.)"""
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = name.endswith(("layernorm.weight", "layer_norm.weight")) and ".layers." in name
            is_source = name.endswith(("v_proj.weight", "up_proj.weight", "fc1.weight", "v_proj.bias", "fc1.bias"))
            if (is_norm and "gemma" not in type(model).__name__.lower()) or is_source:
                param[::8] *= OUTLIER
    return model


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_byte_tokenizer(tmp_path_factory.mktemp("byte-tokenizer")))


@pytest.fixture(scope="session")
def outlier_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (grouped-query attention) with planted outliers and a byte tokenizer, saved as a folder."""
    folder = tmp_path_factory.mktemp("outlier-llama") / "llama"
    plant_outliers(build_tiny_model("llama")).save_pretrained(folder)
    return save_byte_tokenizer(folder)


@pytest.fixture(scope="session")
def helpers():
    from types import SimpleNamespace

    return SimpleNamespace(plant_outliers=plant_outliers, outlier=OUTLIER)
