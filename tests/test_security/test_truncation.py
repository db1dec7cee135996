"""A weight file that shrinks while qformat reads it is one error line, never a death by SIGBUS.

Each case runs in a subprocess: a memory-mapped read of a page past the new end of a file kills the process with
SIGBUS, which is exactly what must not happen (and would take pytest down with it on code that still maps).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qformat

_EXPORT_WHILE_COPYING = """
import os, sys
import qformat.export.compressed_tensors as ct
from qformat.cli.main import cli

folder, victim = sys.argv[1], sys.argv[2]
real_layout = ct.layout_file

def layout_then_shrink(*args, **kwargs):
    layout = real_layout(*args, **kwargs)
    os.truncate(victim, os.path.getsize(victim) // 2)  # the shard shrinks after it was verified and opened
    return layout

ct.layout_file = layout_then_shrink
cli(["export", folder, sys.argv[3], "--to", "vllm"], prog_name="qformat")
"""

_CONVERT_AFTER_PLAN = """
import os, sys
import qformat.converter.api as api
from qformat.cli.main import cli

source, victim = sys.argv[1], sys.argv[2]
real_plan = api.plan_output

def plan_then_shrink(*args, **kwargs):
    layout = real_plan(*args, **kwargs)
    os.truncate(victim, os.path.getsize(victim) // 2)  # the source shrinks after its headers were read
    return layout

api.plan_output = plan_then_shrink
cli(["convert", source, sys.argv[3], "--scheme", "w8a8-int8"], prog_name="qformat")
"""


def _run(script: str, *args: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def w8a16(tiny_models, tmp_path_factory) -> Path:
    """int8 weight-only: its export rewrites the shard (repacking), so the unchanged tensors are copied from it."""
    return qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("trunc") / "ckpt", scheme="w8a16-int8").output


def test_export_of_a_shard_that_shrinks_while_copied_is_one_line(w8a16, tmp_path):
    folder = Path(shutil.copytree(w8a16, tmp_path / "ckpt"))
    result = _run(_EXPORT_WHILE_COPYING, folder, folder / "model.safetensors", tmp_path / "out")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.count("\n") == 1 and "changed while it was read" in result.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_convert_of_a_source_that_shrinks_after_planning_is_one_line(tiny_models, tmp_path):
    source = Path(shutil.copytree(tiny_models["llama"], tmp_path / "src"))
    result = _run(_CONVERT_AFTER_PLAN, source, source / "model.safetensors", tmp_path / "out")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.count("\n") == 1 and "changed while it was read" in result.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize("kind", ["checkpoint", "source"])
def test_a_weight_file_linked_from_outside_the_folder_is_refused(w8a16, tiny_models, tmp_path, kind):
    """A weight file that is a symlink to a file outside the folder is not read (nor, through convert, published)."""
    original = w8a16 if kind == "checkpoint" else tiny_models["llama"]
    folder = Path(shutil.copytree(original, tmp_path / "folder"))
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    error = qformat.FormatError if kind == "checkpoint" else qformat.SourceError
    with pytest.raises(error, match="symlink to a file outside"):
        if kind == "checkpoint":
            qformat.verify(folder)
        else:
            qformat.convert(folder, tmp_path / "out", scheme="w8a8-int8")
