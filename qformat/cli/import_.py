"""`qformat import SOURCE OUTPUT`: a compressed-tensors checkpoint (folder or Hub repo) as a qformat checkpoint."""

from __future__ import annotations

import click

from qformat.cli._errors import install_signal_handlers, reported_errors

__all__ = ["import_command"]

EXAMPLES = """
\b
Examples:
  qformat import ./llama-w8a8-ct ./llama-w8a8
  qformat import RedHatAI/Sparse-Llama-3.1-8B-2of4-FP8-dynamic ./sparse-llama --revision main
"""


@click.command("import", epilog=EXAMPLES)
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--base-model", default=None, metavar="REPO_ID", help="Hub repo id to record as the base model.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
def import_command(source: str, output: str, revision: str | None, base_model: str | None, overwrite: bool) -> None:
    """Import the compressed-tensors checkpoint SOURCE (a folder or Hub repo id) as a qformat checkpoint at OUTPUT."""
    install_signal_handlers()
    with reported_errors("nothing was written to OUTPUT"):
        from qformat.checkpoint.inspect import inspect
        from qformat.export import import_compressed_tensors

        result = import_compressed_tensors(source, output, revision=revision, base_model=base_model,
                                           overwrite=overwrite)
        click.echo(inspect(result.output).to_text())
        if result.sparse_modules:
            click.echo(f"  {len(result.sparse_modules)} module(s) stored 2:4 compressed (qformat's 2:4 kernels run them)")
