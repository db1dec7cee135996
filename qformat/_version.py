"""The qformat package version (the library, not the checkpoint format; see `qformat.spec.FORMAT_VERSION`)."""

__version__ = "0.1.0"
