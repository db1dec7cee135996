"""Shared pieces of the distillation tests: a tiny Llama with peaked outputs, and runs made once per session."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

import qformat
from qformat.testing.tiny_models import save_peaked_llama

#: A short run that still moves the student: 2:4 W8A8 loses a lot on the peaked tiny Llama, training wins it back.
RUN = {"scheme": "w8a8-int8", "sparsity": "2:4", "data": "calibration", "steps": 12, "lr": 1e-3, "batch_size": 4,
       "seq_len": 32}


@pytest.fixture(scope="session")
def peaked_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_peaked_llama(tmp_path_factory.mktemp("peaked") / "llama")


@pytest.fixture(scope="session")
def distilled(peaked_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """name -> (result, output folder) of a run with RUN's options plus the named extras, made once per session."""
    root = tmp_path_factory.mktemp("distilled")

    @functools.cache
    def get(name: str, **extra: object):
        out = root / name
        return qformat.distill(peaked_llama, out, **{**RUN, **extra}), out

    return get
