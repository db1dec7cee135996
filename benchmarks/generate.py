"""End-to-end on this CPU: load, prefill and decode a ~0.5 B random Llama as fp32, bf16, w8a16-int8 and w8a8-int8.

    python benchmarks/generate.py [--data bench-data] [--decode 32] [--prefill 128]

The model is cpu-kernels.md's (hidden 2048, 8 layers, MHA, vocab 32000: 542 M parameters), random bf16 weights,
converted with qformat (by default, which keeps lm_head in bf16, and with lm_head quantized too). Each variant runs in a fresh process so its memory is its own: "load peak anon" is the
highest RssAnon sampled during `from_pretrained` minus RssAnon after the imports (goal for dense schemes:
<= 1.3 x checkpoint bytes + 100 MB); decode is greedy with a KV cache, ms per generated token; prefill is one
forward over `--prefill` tokens. Every variant runs `--repeat` times, interleaved; figures are medians (load
memory: the worst run). Ratios come from this one run.
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

LLAMA_542M = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
              "tie_word_embeddings": False}  # fmt: skip

CHILD = r"""
import json, sys, threading, time
import torch, transformers, qformat
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

folder, dtype_name, prefill, decode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
base = status("RssAnon")
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.005)
sampler = threading.Thread(target=sample, daemon=True); sampler.start()
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
load_s = time.perf_counter() - t
stop.set(); sampler.join()
load_anon = peak[0] - base
weights = sum(p.numel() * p.element_size() for p in model.parameters())
torch.manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (1, prefill))
import statistics
with torch.no_grad():
    model(ids[:, :8])  # warm-up
    prefills = []
    for _ in range(3):
        t = time.perf_counter(); model(ids); prefills.append((time.perf_counter() - t) * 1000)
    prefill_ms = statistics.median(prefills)
    out = model(ids[:, :16], use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(3):  # warm-up steps
        out = model(token, past_key_values=past, use_cache=True); past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode):
        t = time.perf_counter()
        out = model(token, past_key_values=past, use_cache=True); past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        steps.append((time.perf_counter() - t) * 1000)
    decode_ms = statistics.median(steps)
print(json.dumps({"load_s": load_s, "load_anon": load_anon, "weights": weights, "prefill_ms": prefill_ms,
                  "decode_ms": decode_ms, "peak_rss": status("VmHWM")}))
"""


def _checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per variant, interleaved; medians")
    args = parser.parse_args()
    import qformat

    source = make_llama_checkpoint(args.data / "llama-542m", max_shard_bytes=None, shape=LLAMA_542M)
    variants = {"fp32": (source, "fp32"), "bf16": (source, "bf16")}
    for scheme in ("w8a16-int8", "w8a8-int8"):
        for head in (False, True):  # qformat keeps lm_head in bf16 by default; the second variant quantizes it too
            name = f"{scheme} + lm_head" if head else scheme
            out = args.data / f"llama-542m-{scheme}{'-head' if head else ''}"
            if not out.exists():
                qformat.convert(source, out, scheme=scheme, overrides=[f"lm_head={scheme}"] if head else [])
            variants[name] = (out, "bf16")
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits every variant alike
        for name, (folder, dtype) in variants.items():
            proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype, str(args.prefill),
                                   str(args.decode)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {}
    for name, (folder, _) in variants.items():
        merged = {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}
        merged["load_anon"] = max(r["load_anon"] for r in runs[name])  # the memory goal is about the worst run
        results[name] = merged | {"ckpt": _checkpoint_bytes(folder)}
    bf16 = results["bf16"]
    print(f"torch threads: default; prefill {args.prefill} tokens (median of 3), decode: median of {args.decode} "
          "greedy steps with a KV cache")
    print("| variant | resident weights | checkpoint | load s | load peak anon (x ckpt) | prefill ms (x bf16) | "
          "decode ms/token | decode tokens/s x bf16 | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {human(r['weights'])} | {human(r['ckpt'])} | {r['load_s']:.2f} | "
              f"{human(r['load_anon'])} ({r['load_anon'] / r['ckpt']:.2f}) | {r['prefill_ms']:.0f} "
              f"({bf16['prefill_ms'] / r['prefill_ms']:.2f}x) | {r['decode_ms']:.1f} | "
              f"{bf16['decode_ms'] / r['decode_ms']:.2f}x | {human(r['peak_rss'])} |")
    for name in [n for n in results if n.startswith("w8")]:
        r = results[name]
        budget = 1.3 * r["ckpt"] + 100e6
        print(f"load memory goal ({name}): {human(r['load_anon'])} <= 1.3 x {human(r['ckpt'])} + 100 MB = "
              f"{human(budget)}: {'met' if r['load_anon'] <= budget else 'MISSED'}")


if __name__ == "__main__":
    main()
