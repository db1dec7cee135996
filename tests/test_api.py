"""The public surface: every name in `__all__` resolves, and `import qformat` stays light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import qformat

PACKAGES = ["qformat", "qformat.spec", "qformat.io", "qformat.quantize", "qformat.converter", "qformat.checkpoint",
            "qformat.cli", "qformat.testing"]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_resolve(package):
    module = importlib.import_module(package)
    assert len(set(module.__all__)) == len(module.__all__) > 0
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_import_is_light_and_api_functions_are_callable():
    code = "import qformat, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert callable(qformat.convert) and callable(qformat.inspect) and callable(qformat.verify)
    assert qformat.FORMAT_VERSION == 2
    assert issubclass(qformat.SourceError, qformat.QFormatError) and issubclass(qformat.SourceError, ValueError)
    assert issubclass(qformat.WriteError, OSError)
