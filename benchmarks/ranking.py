"""How good is the fallback search's sensitivity ranking? Four rankings of SmolLM2-135M's units compared on the loss
with the top k units kept in full precision (docs/benchmarks.md, "Is the Fisher ranking any good?").

    .venv/bin/python benchmarks/ranking.py [SCHEME]        # default w8a8-int8; about 4 minutes on 2 cores

- `fisher`: `qformat.search.sensitivity` (one forward and backward pass over 1024 calibration tokens);
- `soloKL`: the KL divergence from the source with that unit alone quantized (one forward pass per unit, 256
  calibration tokens): the usual "measure each layer" estimate, M passes;
- each also divided by the unit's number of modules (the cost of keeping it).
Measured on 1024 tokens of the built-in search text; "ub" is the one-sided 95 % bound the search compares with its
budget.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qformat.eval import load_model, load_text, make_task  # noqa: E402
from qformat.models.structure import structure_of  # noqa: E402
from qformat.plan.recipe import QuantRecipe  # noqa: E402
from qformat.plan.rules import plan_conversion  # noqa: E402
from qformat.search.sensitivity import fisher_sensitivity  # noqa: E402
from qformat.search.units import units_of  # noqa: E402
from qformat.search.variants import QuantizedVariants  # noqa: E402
from qformat.testing.real_models import smollm2_folder  # noqa: E402


def main() -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    scheme = sys.argv[1] if len(sys.argv) > 1 else "w8a8-int8"
    folder = smollm2_folder(REPO / "bench-data" / "smollm2")
    model, tokenizer = load_model(folder), AutoTokenizer.from_pretrained(folder)
    plan = plan_conversion(structure_of(model), QuantRecipe(scheme=scheme))
    units = units_of(plan)
    variants = QuantizedVariants(model, plan, units)
    names = [u.name for u in units]
    size = {u.name: len(u.members) for u in units}
    calib = make_task(model, tokenizer, load_text("calibration"), max_tokens=1024)
    small = make_task(model, tokenizer, load_text("calibration"), max_tokens=256)
    search = make_task(model, tokenizer, load_text("search"), max_tokens=1024)
    variants.apply(names)
    with torch.inference_mode():
        ref, small_ref = search.reference(model, cache=None), small.reference(model, cache=True)
    start = time.perf_counter()
    fisher = fisher_sensitivity(variants, calib)
    print(f"fisher: {time.perf_counter() - start:.0f} s", flush=True)
    start, solo = time.perf_counter(), {}
    for name in names:
        variants.apply([n for n in names if n != name])
        with torch.inference_mode():
            solo[name] = small.measure(model, small_ref)["kl_divergence"]
    print(f"soloKL: {time.perf_counter() - start:.0f} s ({len(names)} passes)", flush=True)
    rankings = {"fisher": fisher, "fisher/module": {n: fisher[n] / size[n] for n in names},
                "soloKL": solo, "soloKL/module": {n: solo[n] / size[n] for n in names}}
    base = ref.values["perplexity"]
    for k in (0, 6, 12, 24):
        row = []
        for label, score in rankings.items():
            kept = sorted(names, key=lambda n: -score[n])[:k]
            variants.apply(kept)
            with torch.inference_mode():
                value = search.measure(model, ref)["perplexity"]
            row.append(f"{label} {100 * (value / base - 1):+.2f}% ub {100 * (search.upper['perplexity'] / base - 1):+.2f}% "
                       f"mods {sum(size[n] for n in kept)}")
            if k == 0:
                break
        print(k, " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
