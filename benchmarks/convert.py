"""Conversion speed and memory: qformat vs a plain copy of the source (the disk floor) vs llm-compressor.

Converts a generated ~2.2 GB bf16 Llama-shaped checkpoint (TinyLlama shapes, random weights) laid out as 3 shards of
<= 1 GB and as one 2.2 GB shard, with a cold source (evicted from the page cache before every run), and prints one
table with seconds, GB/s of source, x the synced cold copy, peak RSS, peak anonymous memory above the import
baseline and peak file-backed RSS (mapped source pages, released as tensors are converted). Every figure is the
median of --repeat runs measured in this one process run, interleaved.

    python benchmarks/convert.py [--data bench-data] [--repeat 3] [--scheme w8a8-int8] [--peer /path/to/python]

The peer (llm-compressor's data-free `model_free_ptq`, which also works on safetensors files directly) runs when a
Python with llmcompressor installed is given with --peer (or QFORMAT_BENCH_PEER); its runner script is
benchmarks/_peer_model_free_ptq.py. It quantizes embed_tokens unless told not to, so it is told not to, for fairness.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cold_copy, drop_cache, fresh, human, make_llama_checkpoint, measure_process

HERE = Path(__file__).parent
CHILD = """
import sys, time
import torch, transformers, qformat
from qformat.converter import convert
import transformers.models.llama.modeling_llama  # counted in the import baseline, as for the peer
print("READY", flush=True)
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], scheme=sys.argv[3], observer=sys.argv[4] or None, overwrite=True)
print("CALL_SECONDS", time.perf_counter() - t, flush=True)
"""
PEER_SCHEME = {"w8a8-int8": "W8A8", "fp8-dynamic": "FP8_DYNAMIC"}


def _largest_tensor(folder: Path) -> int:
    from qformat.io.source import SourceCheckpoint

    return max(t.nbytes for t in SourceCheckpoint(folder).tensors.values())


def run_qformat(src: Path, out: Path, scheme: str, observer: str | None) -> dict:
    fresh(out)
    drop_cache(src)
    start = time.perf_counter()
    stats = measure_process([sys.executable, "-c", CHILD, str(src), str(out), scheme, observer or ""])
    wall = time.perf_counter() - start
    call = float(next(line.split()[1] for line in stats.stdout.splitlines() if line.startswith("CALL_SECONDS")))
    return {"seconds": call, "wall": wall, "rss": stats.peak_rss, "anon": stats.peak_anon - stats.baseline_anon,
            "file": stats.peak_file}


def run_peer(python: str, src: Path, out: Path, scheme: str) -> dict:
    fresh(out)
    drop_cache(src)
    env = dict(os.environ, LC_EXTRA_IGNORE="re:.*embed_tokens")
    start = time.perf_counter()
    stats = measure_process([python, str(HERE / "_peer_model_free_ptq.py"), str(src), str(out), PEER_SCHEME[scheme]],
                            env=env, ready_marker="IMPORT_SECONDS")
    wall = time.perf_counter() - start
    call = float(next(line.split()[1] for line in stats.stdout.splitlines() if line.startswith("MODEL_FREE_PTQ_OK")))
    return {"seconds": call, "wall": wall, "rss": stats.peak_rss, "anon": stats.peak_anon - stats.baseline_anon,
            "file": stats.peak_file}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scheme", default="w8a8-int8", choices=sorted(PEER_SCHEME))
    parser.add_argument("--observer", choices=["absmax", "mse"], default=None,
                        help="qformat's scale observer (default: the scheme's, mse for fp8)")
    parser.add_argument("--layouts", default="3,1", help="which source layouts: 3 (shards) and/or 1 (single file)")
    parser.add_argument("--peer", default=os.environ.get("QFORMAT_BENCH_PEER"),
                        help="python of an environment with llmcompressor installed")
    args = parser.parse_args()

    wanted = set(args.layouts.split(","))
    layouts = {}
    if "3" in wanted:
        layouts["3 shards <= 1 GB"] = make_llama_checkpoint(args.data / "llama-2g-3shards", max_shard_bytes=10**9)
    if "1" in wanted:
        layouts["1 shard of 2.2 GB"] = make_llama_checkpoint(args.data / "llama-2g-1shard", max_shard_bytes=None)
    out = args.data / "out"
    rows = []
    for label, src in layouts.items():
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        largest = _largest_tensor(src)
        runs: dict[str, list[dict]] = {"copy": [], "qformat": [], "peer": []}
        for _ in range(args.repeat):  # interleaved, so drift in the machine's speed hits every method alike
            runs["copy"].append(cold_copy(src, out))
            runs["qformat"].append(run_qformat(src, out, args.scheme, args.observer))
            if args.peer:
                runs["peer"].append(run_peer(args.peer, src, out, args.scheme))
        floor = _median(runs["copy"], "seconds")
        observer = args.observer or ("mse" if args.scheme.startswith("fp8") else "absmax")
        for method, name in (("copy", "cp -r + sync (cold)"), ("qformat", f"qformat convert() {args.scheme}, {observer}"),
                             ("peer", f"llm-compressor model_free_ptq {PEER_SCHEME[args.scheme]}")):
            if not runs[method]:
                continue
            secs = _median(runs[method], "seconds")
            rows.append((label, name, secs, _median(runs[method], "wall"), size / secs / 1e9, secs / floor,
                         _median(runs[method], "rss"), _median(runs[method], "anon"), _median(runs[method], "file")))
        fresh(out)
    print(f"source: {human(size)} bf16, largest tensor {human(largest)}; anon budget 3 x largest + 200 MB = "
          f"{human(3 * largest + 200e6)}; median of {args.repeat} runs")
    head = ("layout", "method", "seconds", "process wall s", "GB/s", "x cold copy", "peak RSS",
            "peak anon above imports", "peak file-backed RSS")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, name, secs, wall, gbps, ratio, rss, anon, file in rows:
        print(f"| {label} | {name} | {secs:.2f} | {'-' if wall is None else f'{wall:.2f}'} | {gbps:.2f} | "
              f"{ratio:.2f} | {human(rss)} | {human(anon)} | {human(file)} |")


if __name__ == "__main__":
    main()
