"""`qformat import SOURCE OUTPUT`: a compressed-tensors or bitsandbytes LLM.int8() checkpoint (folder or Hub repo) as
a qformat checkpoint; the source's `quantization_config.quant_method` picks the importer."""

from __future__ import annotations

from pathlib import Path

import click

from qformat.cli._errors import install_signal_handlers, reported_errors

__all__ = ["import_command"]

EXAMPLES = """
\b
Examples:
  qformat import ./llama-w8a8-ct ./llama-w8a8
  qformat import RedHatAI/Sparse-Llama-3.1-8B-2of4-FP8-dynamic ./sparse-llama --revision main
  qformat import vllm-project/fbopt-350m-8bit ./opt-350m-int8    # bitsandbytes LLM.int8()
"""


def _quant_method(source: str, revision: str | None) -> object:
    """The `quant_method` of SOURCE's quantization_config (None when it has none); SOURCE is resolved (a Hub repo is
    downloaded once; the importer then finds it in the cache)."""
    from qformat.errors import FormatError
    from qformat.io.jsonfile import load_json
    from qformat.io.resolve import resolve_source

    config = load_json(resolve_source(source, revision=revision).path / "config.json", error=FormatError)
    raw = config.get("quantization_config") if isinstance(config, dict) else None
    return raw.get("quant_method") if isinstance(raw, dict) else None


@click.command("import", epilog=EXAMPLES)
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--base-model", default=None, metavar="REPO_ID", help="Hub repo id to record as the base model.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
def import_command(source: str, output: str, revision: str | None, base_model: str | None, overwrite: bool) -> None:
    """Import SOURCE (a folder or Hub repo id) as a qformat checkpoint at OUTPUT.

    SOURCE is a compressed-tensors checkpoint (quant_method "compressed-tensors": int8/fp8 schemes, 2:4) or a
    bitsandbytes LLM.int8() checkpoint (quant_method "bitsandbytes", load_in_8bit): its int8 weights become W8A8 with
    its llm_int8_threshold as the outlier threshold and its llm_int8_skip_modules kept in full precision.
    """
    install_signal_handlers()
    with reported_errors("nothing was written to OUTPUT"):
        from qformat.checkpoint.inspect import inspect
        from qformat.export import import_bitsandbytes, import_compressed_tensors
        from qformat.errors import FormatError
        from qformat.io.atomic import check_output_location

        check_output_location(Path(output), source=None, overwrite=overwrite)  # a bad OUTPUT fails before a download
        method = _quant_method(source, revision)
        if method not in (None, "qformat", "compressed-tensors", "bitsandbytes"):
            raise FormatError(f"SOURCE is quantized with quant_method {method!r}; qformat import reads "
                              "compressed-tensors and bitsandbytes LLM.int8() checkpoints only")
        if method == "bitsandbytes":
            result = import_bitsandbytes(source, output, revision=revision, base_model=base_model,
                                         overwrite=overwrite)
        else:  # compressed-tensors, or the importer's own error for anything else
            result = import_compressed_tensors(source, output, revision=revision, base_model=base_model,
                                               overwrite=overwrite)
        click.echo(inspect(result.output).to_text())
        if result.sparse_modules:
            click.echo(f"  {len(result.sparse_modules)} module(s) stored 2:4 compressed (qformat's 2:4 kernels run them)")
