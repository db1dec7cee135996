"""The `qformat` command: a click group that only wires the commands together."""

from __future__ import annotations

import logging

import click

from qformat._version import __version__
from qformat.cli.card import card_command
from qformat.cli.convert import convert_command
from qformat.cli.distill import distill_command
from qformat.cli.evaluate import eval_command
from qformat.cli.export import export_command
from qformat.cli.import_ import import_command
from qformat.cli.inspect import inspect_command
from qformat.cli.push import push_command
from qformat.cli.verify import verify_command

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qformat")
@click.option("-v", "--verbose", is_flag=True, help="Log what qformat does (to stderr).")
def cli(verbose: bool) -> None:
    """Quantized Hugging Face checkpoints: convert, distill, eval, inspect, verify, card, push, export, import."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="qformat: %(message)s")


cli.add_command(convert_command)
cli.add_command(distill_command)
cli.add_command(eval_command)
cli.add_command(inspect_command)
cli.add_command(verify_command)
cli.add_command(card_command)
cli.add_command(push_command)
cli.add_command(export_command)
cli.add_command(import_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="qformat")
