"""The PyPI name: `qformat` on PyPI is an unrelated package, so every install instruction qformat gives names the
distribution it is published under (`qformat.DISTRIBUTION`), and nothing tells a user to `pip install qformat`."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import qformat
from qformat._version import DISTRIBUTION, __version__
from qformat.cards import render_card
from qformat.errors import UnsupportedFormatVersionError
from qformat.spec.config import CheckpointConfig

ROOT = Path(__file__).resolve().parents[2]
#: `pip install qformat` (with options) followed by the end of the name: the stranger's package.
BARE = re.compile(r"pip3?\s+install\s+(?:-\S+\s+)*qformat(?=$|[\s;`'\")\]])", re.MULTILINE)
#: An install instruction that names our distribution.
OURS = re.compile(rf"pip3?\s+install\s+(?:-\S+\s+)*{re.escape(DISTRIBUTION)}(?=$|[\s;`'\")\]])", re.MULTILINE)


def test_distribution_name_is_the_free_one_and_installed():
    assert DISTRIBUTION == "qformat-hf"  # checked free on PyPI (`pip download --no-deps qformat-hf` finds nothing)
    assert importlib.metadata.version(DISTRIBUTION) == __version__  # the installed metadata carries the new name
    scripts = {ep.name: ep.value for ep in importlib.metadata.distribution(DISTRIBUTION).entry_points
               if ep.group == "console_scripts"}
    assert scripts == {"qformat": "qformat.cli.main:main"}  # the command keeps its name


def test_pyproject_publishes_under_the_distribution_name():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^name = "([^"]+)"$', project, re.MULTILINE).group(1) == DISTRIBUTION


@pytest.fixture(scope="module")
def card_text(tiny_models, tmp_path_factory) -> str:
    ckpt = qformat.convert(tiny_models["llama"], tmp_path_factory.mktemp("name") / "llama", scheme="w8a16-int8").output
    return render_card(ckpt)


def test_card_names_the_distribution(card_text):
    assert OURS.search(card_text) and not BARE.search(card_text)


def test_format_version_error_names_the_distribution():
    with pytest.raises(UnsupportedFormatVersionError) as caught:
        CheckpointConfig.from_dict({"quant_method": "qformat", "format_version": 99})
    message = str(caught.value)
    assert OURS.search(message) and not BARE.search(message)


def test_readme_names_the_distribution():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert OURS.search(readme) and not BARE.search(readme)


def test_no_file_in_the_project_says_pip_install_qformat():
    """Everything qformat ships or documents: source, templates, docs, examples, benchmarks, the Makefile."""
    roots = [ROOT / d for d in ("qformat", "docs", "examples", "benchmarks")] + [ROOT / "README.md", ROOT / "Makefile"]
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*")))
             if p.is_file() and p.suffix in ("", ".py", ".md", ".j2", ".txt", ".toml", ".cfg")]
    assert len(files) > 20
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files
                 for m in BARE.finditer(p.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []
