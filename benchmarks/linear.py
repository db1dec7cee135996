"""Linear-layer speed on this CPU or a CUDA GPU: qformat's modules vs fp32/bf16 nn.Linear and the peers, one run.

    python benchmarks/linear.py [--device cpu|cuda] [--ms 1,8,128,512] [--plot docs/linear.png] [--seconds 0.3]

Shapes are cpu-kernels.md's (K x N = in x out: 2048x2048, 4096x4096, 4096x14336). Activations are bf16 for every
quantized row except PyTorch's legacy `quantize_dynamic` (fp32 only, the runtime of Intel's int8-dynamic models).
Peers are rows, not dependencies: torchao (int8 weight-only, W8A8 dynamic; eager) and optimum-quanto (qint8
weights) are measured when importable, and reported as absent otherwise. Every figure is a median over
calls in interleaved rounds (every layer once per round, so the shared machine's slow spells hit all alike);
the ratios (x bf16) come from the same run.

`--device cuda` measures the same rows on the GPU (plus `w8a8-int8+2:4`, the scheme with a CUDA sparse path; the
legacy `quantize_dynamic` is CPU only): qformat's modules are quantized on the CPU and moved, every burst of calls
ends with a synchronize. The process exits 1 if a qformat row fails to run (the table says why), so a GPU check can
rely on its status.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qformat.kernels import trace_paths
from qformat.nn import QuantLinear
from qformat.spec import resolve_scheme_name

SHAPES = [(2048, 2048), (4096, 4096), (4096, 14336)]


def _no_sync() -> None:
    pass


def timed_together(fns: dict[str, Callable[[], object]], seconds: float,
                   sync: Callable[[], None] = _no_sync) -> dict[str, float]:
    """Median milliseconds per call of each function, measured in interleaved rounds.

    Each round times every function once (a burst of calls lasting ~10 ms), so a slow spell of this shared machine
    hits all of them alike; rounds repeat for about `seconds` per function, and at least 7 times. `sync` waits for
    queued work (torch.cuda.synchronize on a GPU, whose calls return before they finish); it ends every burst.
    """
    reps = {}
    for name, fn in fns.items():  # warm-up, and how many calls make ~10 ms
        fn()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        reps[name] = max(1, int(0.010 / max(time.perf_counter() - t, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < 7 or time.perf_counter() - start < seconds * len(fns):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t) * 1000 / reps[name])
        rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def _torchao(linear: torch.nn.Linear, kind: str):
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(copy.deepcopy(linear))
    quantize_(model, Int8WeightOnlyConfig() if kind == "weight-only" else Int8DynamicActivationInt8WeightConfig())
    return model


def _quanto(linear: torch.nn.Linear):
    import copy

    from optimum.quanto import freeze, qint8, quantize

    model = torch.nn.Sequential(copy.deepcopy(linear))
    quantize(model, weights=qint8)
    freeze(model)
    return model


def _legacy_dynamic(linear: torch.nn.Linear):
    import copy

    model = torch.nn.Sequential(copy.deepcopy(linear).float())
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _cpu_only() -> None:
    raise RuntimeError("CPU only")


def build_rows(k: int, n: int, device: torch.device = torch.device("cpu")
               ) -> dict[str, tuple[torch.nn.Module | None, torch.dtype, str]]:
    """name -> (module on `device`, or None if unavailable; activation dtype; note)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(base.weight, std=0.02)
    bf16 = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    bf16.weight.data.copy_(base.weight.data)
    rows: dict[str, tuple[torch.nn.Module | None, torch.dtype, str]] = {
        "fp32 nn.Linear": (base, torch.float32, ""),
        "bf16 nn.Linear": (bf16, torch.bfloat16, ""),
    }
    schemes = ["w8a16-int8", "w8a8-int8", "fp8-dynamic"] + (["w8a8-int8+2:4"] if device.type == "cuda" else [])
    for scheme in schemes:
        # quantized on the CPU, then moved (nn.Module.to moves in place): the same tensors on every device
        module = QuantLinear.from_float(bf16, resolve_scheme_name(scheme)[1], scheme_name=scheme)
        rows[f"qformat {scheme}"] = (module.to(device), torch.bfloat16, "")
    base.to(device)
    bf16.to(device)
    peers = {
        "torchao int8 weight-only": lambda: _torchao(bf16, "weight-only"),
        "torchao W8A8 dynamic": lambda: _torchao(bf16, "dynamic"),
        "optimum-quanto qint8": lambda: _quanto(bf16),
        "quantize_dynamic (fp32)": (lambda: _legacy_dynamic(base)) if device.type == "cpu" else _cpu_only,
    }
    for name, make in peers.items():
        try:
            rows[name] = (make(), torch.float32 if "fp32" in name else torch.bfloat16, "")
        except Exception as exc:  # a missing or broken peer is a row that says so
            rows[name] = (None, torch.bfloat16, f"{type(exc).__name__}: {str(exc)[:60]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1,8,128,512")
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of time vs M per scheme")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    sync = torch.cuda.synchronize if device.type == "cuda" else _no_sync
    results: dict[tuple[int, int], dict[str, dict[int, float]]] = {}
    paths: dict[tuple[int, int, str, int], str] = {}
    failed: list[str] = []
    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}; milliseconds per call (x bf16 in brackets)")
    for k, n in shapes:
        rows = build_rows(k, n, device)
        table: dict[str, dict[int, float]] = {name: {} for name in rows}
        for m in ms:
            x32 = torch.randn(m, k)
            fns = {}
            for name, (module, dtype, _) in rows.items():
                if module is None:
                    continue
                x = x32.to(device=device, dtype=dtype)
                fns[name] = lambda module=module, x=x: module(x)
                if isinstance(module, QuantLinear):
                    try:
                        with trace_paths() as log, torch.no_grad():
                            module(x)
                        sync()
                    except Exception as exc:  # a qformat row that cannot run is a result: reported, and exit 1
                        rows[name] = (None, dtype, f"FAILED at M={m}: {type(exc).__name__}: {str(exc)[:80]}")
                        failed.append(f"{k}x{n} {name}")
                        del fns[name]
                        continue
                    paths[k, n, name, m] = "+".join(p for _, p in log)
            with torch.no_grad():
                for name, ms_per_call in timed_together(fns, args.seconds, sync).items():
                    table[name][m] = ms_per_call
        results[k, n] = table
        head = "| K x N | layer | " + " | ".join(f"M={m}" for m in ms) + " |"
        print(f"\n{head}\n|" + "---|" * (len(ms) + 2))
        for name, (module, _, note) in rows.items():
            if module is None:
                note = note if note.startswith("FAILED") else f"absent: {note}"
                print(f"| {k}x{n} | {name} | " + " | ".join("-" for _ in ms) + f" | {note}")
                continue
            cells = []
            for m in ms:
                t, ref = table[name][m], table["bf16 nn.Linear"][m]
                path = paths.get((k, n, name, m))
                cells.append(f"{t:.2f} ({ref / t:.2f}x){' ' + path if path else ''}")
            print(f"| {k}x{n} | {name} | " + " | ".join(cells) + " |")
    if args.plot:
        _plot(results, ms, args.plot)
    if failed:
        print(f"\nqformat rows that failed: {', '.join(failed)}")
        sys.exit(1)


def _plot(results, ms, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, ((k, n), table) in zip(axes[0], results.items()):
        for name, times in table.items():
            if times:
                style = "-o" if name.startswith(("qformat", "bf16", "fp32")) else "--x"
                ax.plot(list(times), list(times.values()), style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("ms per call")
        ax.set_title(f"K x N = {k} x {n}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
