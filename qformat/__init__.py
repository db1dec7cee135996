"""qformat: quantized Hugging Face checkpoints as a first-class, portable artifact.

Importing qformat is cheap: torch and transformers are imported by the functions that need them. It registers
quant_method "qformat" with transformers: at once if transformers' quantizer registry is already imported, otherwise
the moment it is (see `_qformat_autoload`, which the installed `qformat-autoload.pth` also runs at start-up).
"""

from qformat._version import DISTRIBUTION, __version__
from qformat.errors import (
    CorruptCheckpointError,
    FormatError,
    NonFiniteWeightError,
    OptionError,
    OutputError,
    QFormatError,
    SourceError,
    UnsupportedFormatVersionError,
    UnsupportedModelError,
    WriteError,
)
from qformat.spec import FORMAT_VERSION

try:
    import _qformat_autoload
except ImportError:  # a source tree used without installing: register explicitly with qformat.loaders.register()
    pass
else:
    _qformat_autoload.install()

__all__ = [
    "DISTRIBUTION",
    "FORMAT_VERSION",
    "CorruptCheckpointError",
    "FormatError",
    "NonFiniteWeightError",
    "OptionError",
    "OutputError",
    "QFormatConfig",
    "QFormatError",
    "SourceError",
    "UnsupportedFormatVersionError",
    "UnsupportedModelError",
    "WriteError",
    "__version__",
    "DistillOptions",
    "convert",
    "distill",
    "evaluate",
    "export_compressed_tensors",
    "import_bitsandbytes",
    "import_compressed_tensors",
    "inspect",
    "push",
    "quantize_",
    "verify",
]


def __getattr__(name: str):  # lazy: keep `import qformat` free of torch until a function needs it
    if name == "convert":
        from qformat.converter import convert

        return convert
    if name in ("distill", "DistillOptions"):
        import qformat.train

        return getattr(qformat.train, name)
    if name == "evaluate":
        from qformat.eval import evaluate

        return evaluate
    if name in ("export_compressed_tensors", "import_bitsandbytes", "import_compressed_tensors"):
        import qformat.export

        return getattr(qformat.export, name)
    if name == "inspect":
        from qformat.checkpoint import inspect

        return inspect
    if name == "push":
        from qformat.hub import push

        return push
    if name == "QFormatConfig":  # imports transformers: the class is transformers' quantization_config type
        from qformat.loaders.config import QFormatConfig

        return QFormatConfig
    if name == "quantize_":
        from qformat.loaders.inplace import quantize_

        return quantize_
    if name == "verify":
        from qformat.checkpoint import verify

        return verify
    raise AttributeError(f"module 'qformat' has no attribute {name!r}")
