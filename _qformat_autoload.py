"""Registers qformat's quant_method with transformers the moment transformers imports its quantizer registry.

Installed beside qformat together with `qformat-autoload.pth`, which Python's `site` runs at start-up: it only puts
a tiny finder on `sys.meta_path` (standard library only, no qformat import). When `transformers.quantizers.auto` is
first imported - which happens before any `from_pretrained` can look up a quant_method - the finder lets it load and
then calls `qformat.loaders.register()`. So a user who forgets `import qformat` still loads qformat checkpoints
correctly instead of getting int8 values cast into bf16 weights (transformers only warns about an unknown
quant_method). `import qformat` installs the same finder, for environments that skip .pth files (`python -S`).
Set QFORMAT_NO_AUTOLOAD=1 to switch the hook off.
"""

import os
import sys

_TARGET = "transformers.quantizers.auto"


def _register():
    try:
        import qformat.loaders.transformers  # noqa: F401 - importing it registers (also when it is mid-import)
    except Exception as exc:  # never break the user's import of transformers
        import warnings

        warnings.warn(f"qformat could not register its quant_method with transformers: {exc!r}", stacklevel=2)


class _Loader:
    """Wraps the real loader of transformers' quantizer registry; registers qformat once it has run."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder:
    """Meta-path finder that only ever answers for `transformers.quantizers.auto`."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install():
    """Register now if transformers' registry is already imported, else when it is (idempotent)."""
    if os.environ.get("QFORMAT_NO_AUTOLOAD"):
        return
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
