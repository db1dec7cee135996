"""`qformat convert SOURCE OUTPUT`: any Hugging Face model to a qformat checkpoint."""

from __future__ import annotations

import sys

import click

from qformat.cli._errors import install_signal_handlers, reported_errors
from qformat.cli._options import recipe_options

__all__ = ["convert_command"]

EXAMPLES = """
\b
Examples:
  qformat convert ./my-llama ./my-llama-int8 --scheme w8a8-int8
  qformat convert meta-llama/Llama-3.2-1B ./llama-fp8 --scheme fp8-dynamic --revision main
  qformat convert ./bart ./bart-mixed --scheme w8a8-int8 \\
      --override 're:.*fc[12]=fp8-dynamic' --ignore model.decoder.layers.11.fc2
  qformat convert ./llama ./llama-24 --scheme w8a16-int8 --sparsity 2:4
  qformat convert ./gemma-fp32 ./gemma-int8 --scheme w8a16-int8 --dtype bfloat16
  qformat convert ./smollm2 ./smollm2-int8 --scheme w8a8-int8 --auto-fallback --max-loss 1%
  qformat convert ./smollm2 ./smollm2-int8 --scheme w8a8-int8 --outlier-threshold 6.0
  qformat convert ./smollm2 ./smollm2-sq --scheme w8a8-int8 --smoothquant --alpha 0.5 --calib calib.txt
"""


@click.command("convert", epilog=EXAMPLES)
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@recipe_options
@click.option("--dtype", default="auto", show_default=True, metavar="DTYPE",
              help="Dtype of the tensors kept in full precision (embeddings, norms, biases, fallback modules): "
                   "bfloat16, float16, float32, or auto = config.json's dtype, else as stored.")
@click.option("--base-model", default=None, metavar="REPO_ID",
              help="Hub repo id to record as the base model of a local SOURCE.")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--outlier-threshold", default=None, type=float, metavar="T",
              help="LLM.int8() decomposition for int8 W8A8 modules: input columns where a token reaches |x| >= T "
                   "are multiplied in float (bitsandbytes' default is 6.0). Recorded in the checkpoint.")
@click.option("--smoothquant", is_flag=True,
              help="Fold SmoothQuant's per-channel factors (from --calib text) into the norms and weights before "
                   "quantizing, where the fold is exact for the architecture.")
@click.option("--alpha", default=None, type=float, metavar="A",
              help="SmoothQuant migration strength, 0..1 [default: 0.5].")
@click.option("--smooth-tokens", default=None, type=int, metavar="N",
              help="Tokens of calibration text SmoothQuant runs [default: 2048].")
@click.option("--auto-fallback", is_flag=True,
              help="Keep the most sensitive modules in full precision until the measured loss fits --max-loss "
                   "(sensitivity in one pass, then a bisection search, confirmed on held-out text).")
@click.option("--max-loss", default=None, metavar="FRACTION",
              help="Budget for --auto-fallback, e.g. 1% (relative perplexity or loss increase; 1 - cosine for "
                   "encoders; nats for kl) [default: 1%].")
@click.option("--metric", default=None, metavar="METRIC",
              help="What --auto-fallback measures: ppl, kl, top1 (causal LMs), cosine, rank (encoders), loss, "
                   "rouge (seq2seq) [default: ppl / cosine / loss].")
@click.option("--calib", default=None, metavar="FILE",
              help="Calibration text for SmoothQuant's factors and the sensitivity estimate [default: built-in].")
@click.option("--eval-text", default=None, metavar="FILE", help="Text the search evaluates on [default: built-in].")
@click.option("--heldout-text", default=None, metavar="FILE",
              help="Text the final choice is confirmed on [default: built-in, unseen by the search].")
@click.option("--max-evals", default=None, type=int, metavar="N",
              help="Most full evaluations the search may use (trials plus the confirmation).")
@click.option("--max-fallback", default=None, metavar="N|P%", help="Most units the search may keep (24 or 10%).")
@click.option("--search-tokens", default=None, type=int, metavar="N",
              help="Tokens of the search text (calibration: a quarter, held-out: double) [default: 4096].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
def convert_command(source: str, output: str, scheme: str, ignore: tuple[str, ...], overrides: tuple[str, ...],
                    observer: str | None, sparsity: str | None, dtype: str, base_model: str | None,
                    revision: str | None, max_shard_size: str, outlier_threshold: float | None, smoothquant: bool,
                    alpha: float | None, smooth_tokens: int | None, auto_fallback: bool, max_loss: str | None,
                    metric: str | None, calib: str | None, eval_text: str | None, heldout_text: str | None,
                    max_evals: int | None, max_fallback: str | None, search_tokens: int | None,
                    overwrite: bool) -> None:
    """Convert SOURCE (a model folder or Hub repo id) into a qformat checkpoint at OUTPUT."""
    install_signal_handlers()
    with reported_errors("nothing was written to OUTPUT"):
        from qformat.checkpoint.inspect import inspect
        from qformat.converter import convert

        smoothing = _smoothing(smoothquant, alpha=alpha, calib=calib, max_tokens=smooth_tokens)
        budget = _budget(auto_fallback, max_loss=max_loss, metric=metric,
                         calib=calib if auto_fallback or not smoothquant else None, eval_text=eval_text,
                         heldout_text=heldout_text, max_evals=max_evals, max_fallback=max_fallback,
                         max_tokens=search_tokens)
        if budget is not None or smoothing is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the model is loaded to calibrate; its "Loading weights" bar is noise
        result = convert(source, output, scheme=scheme, ignore=ignore, overrides=overrides, observer=observer,
                         sparsity=sparsity, dtype=dtype, base_model=base_model, revision=revision,
                         max_shard_size=max_shard_size, outlier_threshold=outlier_threshold, smoothquant=smoothing,
                         auto_fallback=budget, overwrite=overwrite,
                         progress=sys.stderr.isatty())
        click.echo(inspect(result.output).to_text())
        if result.search is not None:
            click.echo(result.search.summary(), err=result.search.status != "met")


def _smoothing(enabled: bool, **given: object) -> object:
    """The SmoothQuant options asked for (None without --smoothquant; --alpha and --smooth-tokens need it)."""
    from qformat.errors import OptionError
    from qformat.smooth import SmoothQuant

    given = {k: v for k, v in given.items() if v is not None}
    if not enabled:
        flags = [f for f, key in (("--alpha", "alpha"), ("--smooth-tokens", "max_tokens")) if key in given]
        if flags:
            verb = "applies" if len(flags) == 1 else "apply"
            raise OptionError(f"{', '.join(flags)} only {verb} with --smoothquant; add it or drop them")
        return None
    return SmoothQuant(**given)  # type: ignore[arg-type]


def _budget(enabled: bool, **given: object) -> object:
    """The FallbackBudget the search options ask for (None without --auto-fallback; its options need it)."""
    from qformat.errors import OptionError
    from qformat.search import FallbackBudget

    given = {k: v for k, v in given.items() if v is not None}
    if not enabled:
        if given:
            flags = ", ".join("--" + k.replace("_", "-").replace("max-tokens", "search-tokens") for k in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise OptionError(f"{flags} only {verb} with --auto-fallback; add it or drop them")
        return None
    return FallbackBudget(**given)  # type: ignore[arg-type]
