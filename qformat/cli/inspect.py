"""`qformat inspect DIR`: what a checkpoint holds, as text or JSON."""

from __future__ import annotations

import json

import click

from qformat.cli._errors import reported_errors

__all__ = ["inspect_command"]


@click.command("inspect")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_command(directory: str, as_json: bool) -> None:
    """Summarize the qformat checkpoint in DIRECTORY: schemes, quantized/fallback modules, sizes."""
    with reported_errors("nothing was changed"):
        from qformat.checkpoint.inspect import inspect

        summary = inspect(directory)
        click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.to_text())
