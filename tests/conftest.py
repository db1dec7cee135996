"""Test-wide setup: no network, a private Hugging Face home, the `cuda` marker, and tiny models built once.

The environment is set at import time, before anything imports huggingface_hub (it reads HF_* variables when it is
imported), and is inherited by the CLI subprocesses the tests start.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

assert "huggingface_hub" not in sys.modules, "conftest must configure the Hub environment before it is imported"
_HF_HOME = tempfile.mkdtemp(prefix="qformat-test-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_ENDPOINT", None)

import pytest
import torch

import qformat

from qformat.testing import TINY_ARCHITECTURES, save_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny random model per test architecture (`TINY_ARCHITECTURES`: llama, opt, bart, xlm-roberta,
    llava, gpt-neox, qwen2, gemma3), fp32."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in TINY_ARCHITECTURES}


@pytest.fixture(scope="session")
def converted(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """(arch, scheme) -> the tiny model of `arch` converted to `scheme`, made once per session on first use.
    Test modules that need other options define their own `converted`."""
    root = tmp_path_factory.mktemp("converted")

    @functools.cache
    def get(arch: str, scheme: str) -> Path:
        return qformat.convert(tiny_models[arch], root / f"{arch}-{scheme.replace(':', '')}", scheme=scheme).output

    return get


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-bf16") / "llama", dtype=torch.bfloat16)


def tree_digest(folder: Path) -> str:
    """A digest of every file's relative path, mode and bytes under `folder`: proof that a source was not modified."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        digest.update(rel.encode())
        if path.is_file():
            digest.update(str(path.stat().st_mode).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def digest():
    return tree_digest


@pytest.fixture(scope="session")
def readable(tmp_path_factory: pytest.TempPathFactory):
    """arch -> a saved tiny model of `arch` with a byte-level tokenizer (vocabulary 256, as the tiny models'), so it
    reads real text; made once per session on first use."""
    from qformat.testing.tiny_models import save_byte_tokenizer

    root = tmp_path_factory.mktemp("readable")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = save_byte_tokenizer(save_tiny_model(arch, root / arch))
        return made[arch]

    return get
