"""`qformat export DIR OUTPUT --to vllm`: a compressed-tensors checkpoint that vLLM serves unchanged."""

from __future__ import annotations

import click

from qformat.cli._errors import install_signal_handlers, reported_errors

__all__ = ["export_command"]

EXAMPLES = """
\b
Examples:
  qformat export ./llama-int8 ./llama-int8-vllm --to vllm
  vllm serve ./llama-int8-vllm
"""


@click.command("export", epilog=EXAMPLES)
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--to", "target", type=click.Choice(["vllm", "compressed-tensors"]), required=True,
              help="Target format; 'vllm' and 'compressed-tensors' are the same checkpoint.")
@click.option("--drop-outlier-threshold", is_flag=True,
              help="Export a checkpoint with an LLM.int8() outlier threshold anyway: vLLM runs it as plain W8A8.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
def export_command(directory: str, output: str, target: str, drop_outlier_threshold: bool, overwrite: bool) -> None:
    """Write the qformat checkpoint in DIRECTORY as a compressed-tensors checkpoint at OUTPUT."""
    install_signal_handlers()
    with reported_errors("nothing was written to OUTPUT"):
        from qformat.export import export_compressed_tensors

        result = export_compressed_tensors(directory, output, overwrite=overwrite,
                                           drop_outlier_threshold=drop_outlier_threshold)
        formats = ", ".join(sorted(set(result.groups.values())))
        how = ", ".join(f"{file} {way}" for file, way in result.shards.items())
        click.echo(f"wrote {result.output} (compressed-tensors: {formats}; {how})")
        if result.repacked:
            click.echo(f"  {len(result.repacked)} weight-only int8 module(s) repacked as pack-quantized")
        if result.densified:
            click.echo(f"  {len(result.densified)} 2:4 module(s) written dense: vLLM no longer runs 2:4 sparsity")
        if result.dropped_outlier_threshold is not None:
            click.echo(f"  LLM.int8() outlier threshold {result.dropped_outlier_threshold:g} dropped: vLLM runs the "
                       "int8 modules as plain W8A8", err=True)
        click.echo(f"serve it with: vllm serve {result.output}")
