"""Quantize while loading (issue 10): `from_pretrained` time and memory, qformat vs a plain bf16 load vs peers.

    python benchmarks/load_quantize.py [--data bench-data] [--repeat 3] [--python PEER_PYTHON] [--device cpu|cuda]
                                       [--small] [--rows ROW ...]

The model is the TinyLlama-shaped 1.1 B random bf16 checkpoint of benchmarks/convert.py (one 2.2 GB file,
`<data>/llama-2g-1shard`, generated once and reused); `--small` uses a ~55 M one of the same family instead
(`<data>/llama-55m`), for smoke runs. Every row runs in a fresh process that imports torch, transformers, the
Llama modeling module and the row's quantization library, prints READY, then times one `from_pretrained` call:

- plain bf16: `AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)`, the reference;
- qformat on the fly: `quantization_config=qformat.QFormatConfig(scheme=...)`, for w8a16-int8 and w8a8-int8;
- qformat ahead of time: `qformat.convert(path, out, scheme=...)` (its own row, timed in its own process), then
  `from_pretrained(out)`;
- peers, run with `--python` (default: this interpreter): torchao (`TorchAoConfig` with `Int8WeightOnlyConfig`
  and `Int8DynamicActivationInt8WeightConfig`), optimum-quanto (`QuantoConfig(weights="int8")`) and bitsandbytes
  (`BitsAndBytesConfig(load_in_8bit=True)`). A row whose package does not import, or whose load raises, prints
  the one-line reason instead of figures.

Columns: "load s" is the wall time of the load call alone (median of --repeat processes, rows interleaved, page
cache warm: the files are read once before the first row). "peak RSS" is the process's high-water mark above its
resident size at READY (VmHWM reset through /proc/self/clear_refs at READY, so import transients do not count);
it includes mapped checkpoint pages, which transformers maps rather than copies. "peak anon" is the highest
anonymous (private, not reclaimable) resident memory above READY, sampled every 5 ms. "model in memory" is the
sum of the loaded model's parameter and buffer bytes (tensor subclasses counted by their inner tensors). With
`--device cuda` every load gets `device_map="cuda"` and "peak CUDA" (torch.cuda.max_memory_allocated) is added;
without a CUDA device those rows print a note instead.

Goals (issue 10), for each quantized row:
- memory: peak <= model in memory + the largest full-precision tensor group (the largest module's tensors in the
  source, the most a streaming quantizer must hold unquantized at once) + 300 MB; judged on peak anon on CPU (the
  memory the load cannot give back; peak RSS also counts mapped source pages the kernel can drop) and on peak CUDA
  with --device cuda;
- time: load s <= 1.5 x (plain bf16 load s + qformat.convert s of the matching scheme).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import human, make_llama_checkpoint, measure_process  # noqa: E402

__all__ = ["ROWS", "Row", "main"]

#: ~55 M parameters, Llama layout (32 k vocabulary, 8 layers of 512): for smoke runs.
LLAMA_SMALL = {
    "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}  # fmt: skip
SLACK = 300e6  # the memory goal's allowance for allocator and loader overhead, bytes
TIME_FACTOR = 1.5  # the time goal: load <= 1.5 x (plain bf16 load + streaming convert)


@dataclass(frozen=True)
class Row:
    """One measured configuration: `kind` tells the child what to do, `arg` is its scheme or peer config."""

    key: str
    label: str
    kind: str  # "plain", "qformat", "convert", "preconverted", "peer"
    arg: str = ""
    scheme: str = ""  # the qformat scheme whose convert time the time goal adds; "" for no time goal
    peer: bool = False  # runs with --python


ROWS = (
    Row("bf16", "plain bf16 from_pretrained", "plain"),
    Row("qf-w8a16", "qformat on the fly, w8a16-int8", "qformat", "w8a16-int8", "w8a16-int8"),
    Row("qf-w8a8", "qformat on the fly, w8a8-int8", "qformat", "w8a8-int8", "w8a8-int8"),
    Row("convert-w8a16", "qformat.convert() ahead of time, w8a16-int8", "convert", "w8a16-int8"),
    Row("convert-w8a8", "qformat.convert() ahead of time, w8a8-int8", "convert", "w8a8-int8"),
    Row("pre-w8a16", "load of the converted w8a16-int8", "preconverted", "w8a16-int8", "w8a16-int8"),
    Row("pre-w8a8", "load of the converted w8a8-int8", "preconverted", "w8a8-int8", "w8a8-int8"),
    Row("torchao-w8", "torchao Int8WeightOnlyConfig", "peer", "torchao-w8", "w8a16-int8", True),
    Row("torchao-w8a8", "torchao Int8DynamicActivationInt8WeightConfig", "peer", "torchao-w8a8", "w8a8-int8", True),
    Row("quanto-w8", 'optimum-quanto QuantoConfig(weights="int8")', "peer", "quanto-w8", "w8a16-int8", True),
    Row("bnb-8bit", "bitsandbytes BitsAndBytesConfig(load_in_8bit=True)", "peer", "bnb-8bit", "w8a8-int8", True),
)

# The child: argv = kind, arg, source folder, output folder, device. Prints READY after its imports, then one
# RESULT json line, or SKIP and a one-line reason. Its stderr goes to a log file (env LOAD_QUANTIZE_LOG), so
# warnings and progress bars cannot fill a pipe nobody reads during the load.
CHILD = r"""
import json, os, sys, time
log = os.open(os.environ["LOAD_QUANTIZE_LOG"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(log, 2)
kind, arg, src, out, device = sys.argv[1:6]


def skip(reason):
    print("SKIP " + " ".join(str(reason).split())[:200], flush=True)
    sys.exit(0)


def why(exc):
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if any(word in lowered for word in ("cuda", "gpu", "xpu", "accelerator")):
        return "needs CUDA: " + text
    return text


import torch
import transformers
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama  # imported lazily otherwise, inside the timed call

if device == "cuda" and not torch.cuda.is_available():
    skip("no CUDA device here")
kwargs = {"dtype": torch.bfloat16}
if device == "cuda":
    kwargs["device_map"] = "cuda"
try:
    if kind in ("qformat", "convert", "preconverted"):
        import qformat
    if kind == "qformat":
        from qformat import QFormatConfig
        kwargs["quantization_config"] = QFormatConfig(scheme=arg)
    elif kind == "peer" and arg.startswith("torchao"):
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
        config = Int8WeightOnlyConfig() if arg == "torchao-w8" else Int8DynamicActivationInt8WeightConfig()
        kwargs["quantization_config"] = transformers.TorchAoConfig(config)
    elif kind == "peer" and arg.startswith("quanto"):
        import optimum.quanto
        kwargs["quantization_config"] = transformers.QuantoConfig(weights="int8")
    elif kind == "peer" and arg.startswith("bnb"):
        import bitsandbytes
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
except ImportError as exc:
    skip(("not available yet: " if kind == "qformat" else "not installed: ") + f"{type(exc).__name__}: {exc}")
except Exception as exc:
    skip(why(exc))


def tensor_bytes(t, seen):
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = inner()
        return sum(tensor_bytes(getattr(t, name), seen) for name in names)
    if t.device.type == "meta" or t.data_ptr() in seen:
        return 0
    seen.add(t.data_ptr())
    extra = getattr(t, "SCB", None)  # bitsandbytes keeps its int8 row scales on the Int8Params
    return t.numel() * t.element_size() + (tensor_bytes(extra, seen) if isinstance(extra, torch.Tensor) else 0)


def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


if device == "cuda":
    torch.cuda.init()
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS: the peak then counts from here
    hwm_reset = True
except OSError:
    hwm_reset = False
baseline = status("VmRSS")
print("READY", flush=True)
start = time.perf_counter()
try:
    if kind == "convert":
        qformat.convert(src, out, scheme=arg, overwrite=True)
        model = None
    else:
        model = AutoModelForCausalLM.from_pretrained(out if kind == "preconverted" else src, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
except Exception as exc:
    skip(why(exc))
seconds = time.perf_counter() - start
peak = status("VmHWM") - baseline if hwm_reset else None
size = None
if model is not None:
    seen = set()
    size = sum(tensor_bytes(t, seen) for t in list(model.parameters()) + list(model.buffers()))
cuda = torch.cuda.max_memory_allocated() if device == "cuda" else None
print("RESULT " + json.dumps({"seconds": seconds, "rss": peak, "size": size, "cuda": cuda}), flush=True)
"""


def largest_group(folder: Path) -> int:
    """Bytes of the largest module's tensors (weight + bias, ...) in the source's safetensors headers."""
    groups: dict[str, int] = {}
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                module = name.rsplit(".", 1)[0]
                groups[module] = groups.get(module, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return max(groups.values())


def warm(folder: Path) -> None:
    """Read every file of `folder` once, so each load finds the checkpoint in the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_row(row: Row, python: str, src: Path, out: Path, device: str, logs: Path) -> dict:
    """One fresh process for `row`: its figures, or {"skip": reason}."""
    env = dict(os.environ, LOAD_QUANTIZE_LOG=str(logs / f"{row.key}.log"), TQDM_DISABLE="1")
    cmd = [python if row.peer else sys.executable, "-c", CHILD, row.kind, row.arg, str(src), str(out), device]
    try:
        stats = measure_process(cmd, env=env)
    except RuntimeError as exc:
        return {"skip": f"child process failed ({exc}); see {logs / (row.key + '.log')}"}
    for line in stats.stdout.splitlines():
        if line.startswith("SKIP "):
            return {"skip": line[5:]}
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            result["anon"] = stats.peak_anon - stats.baseline_anon
            return result
    return {"skip": f"no result printed; see {logs / (row.key + '.log')}"}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}"


def _verdict(value: float | None, limit: float | None) -> str:
    if value is None or limit is None:
        return "-"
    return "met" if value <= limit else "**missed**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per row, interleaved; medians")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the peer rows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--small", action="store_true", help="a ~55 M model instead of the 1.1 B one (smoke runs)")
    parser.add_argument("--rows", nargs="+", choices=[r.key for r in ROWS], default=[r.key for r in ROWS])
    args = parser.parse_args()

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: the --device cuda rows are skipped (run without --device for the CPU rows)")
            return
    if args.small:
        src = make_llama_checkpoint(args.data / "llama-55m", max_shard_bytes=None, shape=LLAMA_SMALL)
    else:
        src = make_llama_checkpoint(args.data / "llama-2g-1shard", max_shard_bytes=None)
    work = args.data / "load-quantize"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    converted = {r.arg: work / f"{src.name}-{r.arg}" for r in ROWS if r.kind in ("convert", "preconverted")}
    # A load of a converted model needs its conversion (and the time goal its seconds): asking for one asks for both.
    wanted = set(args.rows) | {f"convert-{k.split('-', 1)[1]}" for k in args.rows if k.startswith("pre-")}
    rows = [r for r in ROWS if r.key in wanted]
    warm(src)
    runs: dict[str, list[dict]] = {r.key: [] for r in rows}
    skips: dict[str, str] = {}
    for _ in range(args.repeat):
        for r in rows:
            if r.key in skips:
                continue
            if r.kind == "preconverted":
                warm(converted[r.arg])
            out = converted.get(r.arg, work / "unused")
            result = run_row(r, args.python, src, out, args.device, logs)
            if "skip" in result:
                skips[r.key] = result["skip"]
            else:
                runs[r.key].append(result)

    group = largest_group(src)
    source = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    plain = _median(runs.get("bf16", []), "seconds")
    convert_s = {r.arg: _median(runs[r.key], "seconds") for r in rows if r.kind == "convert" and runs[r.key]}
    cuda = args.device == "cuda"
    peak_key = "cuda" if cuda else "anon"
    print(f"source: {src.name}, {human(source)} bf16; largest full-precision tensor group {human(group)}; "
          f"device {args.device}; median of {args.repeat} fresh processes, page cache warm; python for peers: "
          f"{args.python}")
    head = ["row", "load s", "peak RSS MB", "peak anon MB"] + (["peak CUDA MB"] if cuda else [])
    head += ["model in memory MB", f"memory goal (peak {peak_key} <= model + group + 300 MB)",
             "time goal (<= 1.5 x (bf16 load + convert))"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if r.key in skips:
            print(f"| {r.label} | {skips[r.key]} |" + " |" * (len(head) - 2))
            continue
        secs, size = _median(runs[r.key], "seconds"), _median(runs[r.key], "size")
        peak = _median(runs[r.key], peak_key)
        quantized = r.kind in ("qformat", "preconverted", "peer")
        mem_limit = size + group + SLACK if quantized and size is not None else None
        conv = convert_s.get(r.scheme)
        time_limit = TIME_FACTOR * (plain + conv) if quantized and plain is not None and conv is not None else None
        cells = [r.label, f"{secs:.2f}", _mb(_median(runs[r.key], "rss")), _mb(_median(runs[r.key], "anon"))]
        cells += [_mb(_median(runs[r.key], "cuda"))] if cuda else []
        cells += [_mb(size), _verdict(peak, mem_limit) + ("" if mem_limit is None else f" ({_mb(mem_limit)})"),
                  _verdict(secs, time_limit) + ("" if time_limit is None else f" ({time_limit:.2f} s)")]
        print("| " + " | ".join(cells) + " |")
    failed = [r.label for r in rows if r.kind != "peer" and r.key in skips]
    if failed:  # a peer may be missing; a qformat or plain row may not (make gpu-check relies on the exit code)
        print("qformat rows that failed: " + "; ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
