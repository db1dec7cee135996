"""The qformat command line (click). Commands are thin: they parse, call one library function and print."""

from qformat.cli.main import cli, main

__all__ = ["cli", "main"]
