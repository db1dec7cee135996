"""Export (and import) time of a ~2 GB qformat checkpoint vs a plain copy of it, in one run.

Generates a ~3.9 GB bf16 Llama-shaped checkpoint (1.95B parameters, random weights) once, converts it to ~2 GB qformat
checkpoints (w8a8-int8: every shard is hard-linked by the export; w8a16-int8: every Linear is repacked as
pack-quantized; fp8-dynamic+2:4: every Linear is written dense), then times, interleaved and with a cold page cache
before every run: `cp -r` + `sync` of the checkpoint (the floor for anything that writes its bytes),
`qformat export --to vllm`, and `qformat import` of that export back. Each qformat figure is the time of the call
inside a child process (imports excluded); the table gives the median of --repeat runs and x the cold copy.

    python benchmarks/export.py [--data bench-data] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cold_copy, drop_cache, fresh, human, make_llama_checkpoint, measure_process

#: 1.95B parameters: ~3.9 GB in bf16, ~2.1 GB with int8 Linear weights (embeddings stay bf16).
LLAMA_4G = {
    "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 20,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}  # fmt: skip
SCHEMES = ("w8a8-int8", "w8a16-int8", "fp8-dynamic+2:4")
CHILD = """
import sys, time
import qformat, qformat.export, transformers.models.llama.modeling_llama
fn = getattr(qformat.export, sys.argv[1])
print("READY", flush=True)
t = time.perf_counter()
fn(sys.argv[2], sys.argv[3], overwrite=True)
print("CALL_SECONDS", time.perf_counter() - t, flush=True)
"""


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_qformat(function: str, src: Path, out: Path) -> dict:
    fresh(out)
    drop_cache(src)
    stats = measure_process([sys.executable, "-c", CHILD, function, str(src), str(out)])
    call = float(next(line.split()[1] for line in stats.stdout.splitlines() if line.startswith("CALL_SECONDS")))
    return {"seconds": call, "anon": stats.peak_anon - stats.baseline_anon}


def _prepare(data: Path) -> dict[str, Path]:
    import qformat

    source = make_llama_checkpoint(data / "llama-4g", max_shard_bytes=2 * 10**9, shape=LLAMA_4G)
    checkpoints = {}
    for scheme in SCHEMES:
        folder = data / f"llama-4g-{scheme.replace(':', '')}"
        if not (folder / "config.json").exists():
            qformat.convert(source, folder, scheme=scheme, max_shard_size="1GB", overwrite=True)
        checkpoints[scheme] = folder
    return checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    checkpoints = _prepare(args.data)
    exported, copied, back = args.data / "out-export", args.data / "out-copy", args.data / "out-import"
    rows = []
    for scheme, folder in checkpoints.items():
        runs: dict[str, list[dict]] = {"copy": [], "export": [], "import": []}
        for _ in range(args.repeat):  # interleaved, so drift in the machine's speed hits every method alike
            runs["copy"].append(cold_copy(folder, copied))
            runs["export"].append(run_qformat("export_compressed_tensors", folder, exported))
            runs["import"].append(run_qformat("import_compressed_tensors", exported, back))
        floor = statistics.median(r["seconds"] for r in runs["copy"])
        sizes = {"copy": _size(folder), "export": _size(exported), "import": _size(back)}
        shards = len(list(folder.glob("*.safetensors")))
        for method, label in (("copy", "cp -r + sync (cold)"), ("export", "qformat export --to vllm"),
                              ("import", "qformat import (of the export)")):
            secs = statistics.median(r["seconds"] for r in runs[method])
            anon = statistics.median(r["anon"] for r in runs[method])
            rows.append((f"{scheme} ({human(sizes['copy'])}, {shards} shards)", label, secs, secs / floor,
                         sizes[method], anon))
        for path in (copied, exported, back):
            fresh(path)
    print(f"median of {args.repeat} runs, cold page cache before each")
    head = ("checkpoint", "operation", "seconds", "x cold copy", "output size", "peak anon memory")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, name, secs, ratio, size, anon in rows:
        print(f"| {label} | {name} | {secs:.2f} | {ratio:.2f} | {human(size)} | {human(anon)} |")


if __name__ == "__main__":
    main()
