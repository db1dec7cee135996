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
  qformat eval ./smollm2-int8 --against ./smollm2 --tasks hellaswag,arc_easy --record   # needs qformat-hf[harness]
  qformat eval ./smollm2-int8 --tasks my_quiz --include-path ./my-tasks --limit 100
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
@click.option("--tasks", "tasks", multiple=True, metavar="NAMES",
              help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy): run only these, not "
                   "the perplexity/agreement metrics (which --text and --max-tokens configure). Needs the lm-eval "
                   "package: pip install 'qformat-hf[harness]'.")
@click.option("--include-path", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="A folder of harness task YAML files (with --tasks); their relative data paths are read "
                   "relative to each file.")
@click.option("--limit", default=None, type=int, metavar="N",
              help="Score only the first N documents of each harness task (a quick look, not a published figure).")
@click.option("--num-fewshot", default=None, type=int, metavar="N",
              help="Few-shot examples per harness prompt [default: each task's own].")
@click.option("--batch-size", default=None, type=int, metavar="N", help="Harness documents per batch [default: 1].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_command(model: str, against: str | None, texts: tuple[str, ...], max_tokens: int | None, record: bool,
                 tasks: tuple[str, ...], include_path: str | None, limit: int | None, num_fewshot: int | None,
                 batch_size: int | None, as_json: bool) -> None:
    """Evaluate MODEL (a qformat checkpoint or any model folder), against SOURCE when given.

    With --tasks, runs only those lm-evaluation-harness tasks, on MODEL (loaded by qformat, so a qformat
    checkpoint runs on its own kernels) and on SOURCE for the baseline.
    """
    with reported_errors("nothing was recorded"):
        from transformers.utils import logging as hf_logging

        from qformat.errors import OptionError
        from qformat.eval import DEFAULT_MAX_TOKENS, evaluate

        hf_logging.disable_progress_bar()  # "Loading weights" bars per model would bury the table

        names = [n.strip() for group in tasks for n in group.split(",") if n.strip()]
        if tasks and not names:
            raise OptionError("--tasks needs task names, e.g. --tasks hellaswag,arc_easy")
        if names and (texts or max_tokens is not None):
            raise OptionError("--tasks runs only lm-evaluation-harness tasks; --text and --max-tokens configure "
                              "the perplexity run: run them separately")
        if not names and batch_size is not None:
            raise OptionError("--batch-size applies to lm-evaluation-harness tasks; give --tasks too")
        report = evaluate(model, against=against, texts=list(texts), max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
                          tasks=names, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                          batch_size=batch_size or 1, record=record, progress=sys.stderr.isatty())
        if as_json:
            click.echo(json.dumps(list(report.results), indent=2))
        else:
            click.echo(report.to_text())
