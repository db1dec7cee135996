"""What the loader's checks of an untrusted checkpoint cost (issue 9): `from_pretrained` with and without them.

    python benchmarks/load_checks.py [--data bench-data] [--repeat 3] [--schemes w8a8-int8 fp8-dynamic w8a8-int8+2:4]

The model is the TinyLlama-shaped 1.1 B random bf16 checkpoint of benchmarks/convert.py (one 2.2 GB file, reused
if `--data` already holds it), converted once per scheme with absmax scales (lm_head stays bf16, qformat's
default). Each load runs in a fresh process; "load s" is `AutoModelForCausalLM.from_pretrained(folder,
dtype=bfloat16)` after the imports, with the checkpoint in the page cache (a warm-up load per scheme first), which
is the stricter case: a cold read only makes the load longer and the checks' share smaller. "checks off" flips the
loader's private `_CHECKS` switch, which exists for this measurement only. Checks on and off alternate, scheme by
scheme, `--repeat` times; figures are medians. "checks s" is the time spent inside the check functions themselves
(timed in the checks-on processes), which is far less noisy than the difference of two load medians. "first
forward s" is the forward pass over 8 tokens that follows: transformers maps safetensors data without copying it, so
a check that reads every stored byte (fp8 NaN codes) faults in pages the first forward would otherwise fault in.
Goal: checks <= 5 % of load time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import human, make_llama_checkpoint  # noqa: E402

GOAL = 0.05  # checks <= 5 % of load time

CHILD = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama  # imported lazily otherwise, inside the timed call
import qformat.loaders.transformers as loader

folder, checks = sys.argv[1], sys.argv[2] == "on"
loader._CHECKS = checks
spent = [0.0]

def timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
    return wrapper

for name in ("_check_scheme_fits", "_check_nothing_quantized_elsewhere", "_check_values"):
    setattr(loader, name, timed(getattr(loader, name)))
print("READY", flush=True)
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
load_s = time.perf_counter() - start
start = time.perf_counter()
with torch.no_grad():
    model(torch.arange(8).reshape(1, 8))
forward_s = time.perf_counter() - start
print(json.dumps({"load_s": load_s, "checks_s": spent[0], "forward_s": forward_s}))
"""


def _load(folder: Path, checks: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), checks], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"load of {folder} with checks {checks} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _checkpoint(data: Path, source: Path, scheme: str) -> Path:
    import qformat

    out = data / f"llama-2g-{scheme.replace(':', '')}"
    if not (out / "config.json").exists():
        qformat.convert(source, out, scheme=scheme, observer="absmax")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per variant, interleaved; medians")
    parser.add_argument("--schemes", nargs="+", default=["w8a8-int8", "fp8-dynamic", "w8a8-int8+2:4"])
    args = parser.parse_args()
    source = make_llama_checkpoint(args.data / "llama-2g-1shard", max_shard_bytes=None)
    folders = {scheme: _checkpoint(args.data, source, scheme) for scheme in args.schemes}
    runs: dict[tuple[str, str], list[dict]] = {(s, c): [] for s in folders for c in ("on", "off")}
    for folder in folders.values():
        _load(folder, "on")  # warm-up: the checkpoint's pages in the cache, and the check it loads at all
    for _ in range(args.repeat):
        for scheme, folder in folders.items():
            for checks in ("on", "off"):
                runs[scheme, checks].append(_load(folder, checks))
    print(f"median of {args.repeat} fresh processes each, checks on/off interleaved, warm page cache")
    print("| scheme | checkpoint | load s, checks on | load s, checks off | difference | checks s (timed) | "
          "checks / load | goal <= 5 % | first forward s, on / off | checks / (load + first forward) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scheme, folder in folders.items():
        on = statistics.median(r["load_s"] for r in runs[scheme, "on"])
        off = statistics.median(r["load_s"] for r in runs[scheme, "off"])
        checks = statistics.median(r["checks_s"] for r in runs[scheme, "on"])
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        fwd_on = statistics.median(r["forward_s"] for r in runs[scheme, "on"])
        fwd_off = statistics.median(r["forward_s"] for r in runs[scheme, "off"])
        share = checks / on
        print(f"| {scheme} | {human(size)} | {on:.2f} | {off:.2f} | {on - off:+.2f} ({(on - off) / off:+.1%}) | "
              f"{checks:.3f} | {share:.1%} | {'met' if share <= GOAL else 'MISSED'} | {fwd_on:.2f} / {fwd_off:.2f} | "
              f"{checks / (on + fwd_on):.1%} |")


if __name__ == "__main__":
    main()
