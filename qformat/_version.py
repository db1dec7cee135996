"""The package version (the library, not the checkpoint format; see `qformat.spec.FORMAT_VERSION`) and the name it
is published under.

The distribution name differs from the import name: `qformat` on PyPI is an unrelated package (which also installs a
top-level `qformat` module), so qformat is published as `qformat-hf`. Every install hint qformat prints or writes
(cards, error messages) takes the name from `DISTRIBUTION`; pyproject.toml's `[project] name` must equal it.
"""

__all__ = ["DISTRIBUTION", "__version__"]

__version__ = "0.1.0"

#: The PyPI distribution name: `pip install qformat-hf` gives `import qformat` and the `qformat` command.
DISTRIBUTION = "qformat-hf"
