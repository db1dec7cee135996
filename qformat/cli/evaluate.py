"""`qformat eval DIR`: measure a model (perplexity, agreement with its source, embedding cosine, ...)."""

from __future__ import annotations

import json
import sys

import click

from qformat.cli._errors import reported_errors

__all__ = ["eval_command"]

EXAMPLES = """
\b
Examples:
  qformat eval ./smollm2-int8 --against ./smollm2            # perplexity, KL, top-1 agreement on built-in text
  qformat eval ./minilm-int8 --against ./minilm --json       # embedding cosine and similarity ranking
  qformat eval ./smollm2-int8 --against ./smollm2 --text wiki.txt --max-tokens 8192 --record
"""


@click.command("eval", epilog=EXAMPLES)
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--against", default=None, metavar="SOURCE",
              help="The full-precision source (folder or Hub repo id) to compare with.")
@click.option("--text", "texts", multiple=True, metavar="FILE",
              help="UTF-8 text to evaluate on (repeatable). Default: a held-out part of CPython's pydoc topics "
                   "(built-in names: heldout, search, calibration).")
@click.option("--max-tokens", default=None, type=int, metavar="N", help="Tokens evaluated per text [default: 2048].")
@click.option("--record", is_flag=True,
              help="Write the results into MODEL's config.json (quantization_config.evaluation), changing nothing "
                   "else; `qformat card` then shows them.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_command(model: str, against: str | None, texts: tuple[str, ...], max_tokens: int | None, record: bool,
                 as_json: bool) -> None:
    """Evaluate MODEL (a qformat checkpoint or any model folder), against SOURCE when given."""
    with reported_errors("nothing was recorded"):
        from transformers.utils import logging as hf_logging

        from qformat.eval import DEFAULT_MAX_TOKENS, evaluate

        hf_logging.disable_progress_bar()  # "Loading weights" bars per model would bury the table

        report = evaluate(model, against=against, texts=list(texts), max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
                          record=record, progress=sys.stderr.isatty())
        if as_json:
            click.echo(json.dumps(list(report.results), indent=2))
        else:
            click.echo(report.to_text())
