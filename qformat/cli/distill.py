"""`qformat distill SOURCE OUTPUT`: self-distilled quantization-aware training that writes a qformat checkpoint."""

from __future__ import annotations

import sys

import click

from qformat.cli._errors import install_signal_handlers, reported_errors
from qformat.cli._options import recipe_options

__all__ = ["distill_command"]

EXAMPLES = """
\b
Examples:
  qformat distill ./smollm2 ./smollm2-sdq --scheme w8a8-int8 --data train.txt --eval-text heldout.txt
  qformat distill ./minilm ./minilm-24 --scheme w8a8-int8 --sparsity 2:4 --data sentences.txt --steps 400
  qformat distill ./xlmr-xnli ./xlmr-int8 --scheme w8a16-int8 --data xnli-train.jsonl --loss-weights task=1,output=1
  qformat distill ./smollm2 ./out --data train.txt --save-every 50 --state-dir ./state   # then: --resume ./state
  torchrun --nproc-per-node 8 -m qformat distill ./llama ./llama-sdq --data train.txt --batch-size 64
"""


@click.command("distill", epilog=EXAMPLES)
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@recipe_options
@click.option("--data", required=True, metavar="FILE",
              help="Training text (UTF-8; a causal LM reads windows of it, an encoder its paragraphs), a .jsonl of "
                   "{\"text\": ..., \"label\": N} lines, or a built-in text name (calibration, search).")
@click.option("--eval-text", default=None, metavar="FILE",
              help="Measure SOURCE's plain quantization (before) and the result (after) against SOURCE on this "
                   "text, and record them. Use text the training did not read.")
@click.option("--eval-tokens", default=8192, show_default=True, type=int, metavar="N", help="Tokens of --eval-text.")
@click.option("--steps", default=None, type=int, metavar="N", help="Training steps [default: 200].")
@click.option("--lr", default=None, type=float, help="Peak learning rate of AdamW [default: 1e-5].")
@click.option("--batch-size", default=None, type=int, metavar="N",
              help="Sequences per step, over all processes [default: 4].")
@click.option("--seq-len", default=None, type=int, metavar="N", help="Tokens per sequence [default: 256].")
@click.option("--noise-rate", default=None, type=float, metavar="P",
              help="Share of weight blocks quantized per step (Quant-Noise); 1 = every weight (plain QAT) "
                   "[default: 0.5].")
@click.option("--noise-block", default=None, type=int, metavar="N",
              help="Input columns per noise block [default: 8].")
@click.option("--loss-weights", default=None, metavar="TERMS",
              help="Weights of the loss terms, e.g. task=1,output=1,attention=0.5 (0 turns one off) "
                   "[default: output 1, attention 1, task 1 for labeled .jsonl data, else 0].")
@click.option("--temperature", default=None, type=float, help="Softmax temperature of the output KL [default: 1].")
@click.option("--warmup", default=None, type=float, metavar="FRACTION",
              help="Share of steps with linear warmup [default: 0.05].")
@click.option("--seed", default=None, type=int, help="Seed of the data order and the noise [default: 0].")
@click.option("--save-every", default=None, type=int, metavar="N", help="Save a resumable state every N steps.")
@click.option("--state-dir", default=None, metavar="DIR", help="Where --save-every writes the state.")
@click.option("--resume", default=None, metavar="DIR", help="Continue the run whose state is in DIR.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="Under torchrun/accelerate: replicate the student (DDP) or shard it (FSDP).")
@click.option("--dtype", default="auto", show_default=True, metavar="DTYPE",
              help="Dtype of the tensors kept in full precision: bfloat16, float16, float32, or auto (as trained, "
                   "float32).")
@click.option("--device", default=None, metavar="DEVICE",
              help="cpu, cuda or cuda:N [default: CUDA device LOCAL_RANK if CUDA is available, else cpu].")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
def distill_command(source: str, output: str, scheme: str, data: str, eval_text: str | None, eval_tokens: int,
                    steps: int | None, lr: float | None, batch_size: int | None, seq_len: int | None,
                    noise_rate: float | None, noise_block: int | None, loss_weights: str | None,
                    temperature: float | None, warmup: float | None, seed: int | None, save_every: int | None,
                    state_dir: str | None, resume: str | None, strategy: str, ignore: tuple[str, ...],
                    overrides: tuple[str, ...], observer: str | None, sparsity: str | None, dtype: str,
                    device: str | None, revision: str | None, overwrite: bool) -> None:
    """Train a quantized copy of SOURCE against SOURCE itself (SDQ) and write it as a qformat checkpoint."""
    install_signal_handlers()
    with reported_errors("nothing was written to OUTPUT"):
        from transformers.utils import logging as hf_logging

        from qformat.checkpoint.inspect import inspect
        from qformat.train import DistillOptions, distill

        hf_logging.disable_progress_bar()
        given = {"steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len, "noise_rate": noise_rate,
                 "noise_block": noise_block, "loss_weights": loss_weights, "temperature": temperature,
                 "warmup": warmup, "seed": seed, "save_every": save_every}
        options = DistillOptions(**{k: v for k, v in given.items() if v is not None})
        result = distill(source, output, data=data, scheme=scheme, ignore=ignore, overrides=overrides,
                         observer=observer, sparsity=sparsity, dtype=dtype, options=options, eval_text=eval_text,
                         eval_tokens=eval_tokens, state_dir=state_dir, resume=resume, strategy=strategy,
                         device=device, revision=revision, overwrite=overwrite, progress=sys.stderr.isatty())
        if result.output is None:  # not rank 0 of a distributed run
            return
        losses = ", ".join(f"{k} {v:.4g}" for k, v in result.final_losses.items())
        click.echo(f"trained {len(result.log.steps)} steps in {result.log.seconds:.0f} s; final losses: {losses}")
        if result.evaluation is not None:
            e, metric = result.evaluation, result.evaluation["metric"]
            click.echo(f"{metric} on {e['text']['dataset']}: source {e['source'][metric]:.5g}, quantized without "
                       f"training {e['before'][metric]:.5g}, distilled {e['after'][metric]:.5g}")
        click.echo(inspect(result.output).to_text())
