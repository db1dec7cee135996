"""`make gpu-check`: every `cuda`-marked test and the CUDA rows of benchmarks/linear.py and load_quantize.py, then one
summary.

Meant for a machine with a CUDA GPU and its own preinstalled stack (no network, no install step): run from the
repository root with the source tree on PYTHONPATH, by whatever `python3` has torch. Each step runs in its own
process group under a timeout taken from one overall deadline (`TOTAL_SECONDS`), so the whole check always ends
within 8 minutes, whatever hangs. Prints one summary at the end: the tests' counts and failures, and the benchmark
table. Exit status 0 only if the tests ran to the end with none failed and every qformat benchmark row ran; without
CUDA (or without torch) it says "no CUDA", runs nothing and exits 0, unless the machine has an NVIDIA device that
torch cannot use, which is a failure.

    python3 scripts/gpu_check.py [--tests-only | --bench-only]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
#: The whole check ends within this many seconds (8 minutes minus room for start-up and the summary).
TOTAL_SECONDS = 450
#: Per-step limits, each also capped by what is left of `TOTAL_SECONDS`.
PROBE_SECONDS = 60
TESTS_SECONDS = 240
#: The tests leave at least this much of the deadline to the benchmarks.
BENCH_RESERVE = 150
#: (script, arguments, seconds): each small enough for about a minute on one GPU. linear.py: the three default
#: shapes at four token counts; load_quantize.py: quantizing while loading with device_map="cuda" on the ~55 M model
#: (qformat and plain rows; peers are not installed there).
BENCHMARKS = (
    ("benchmarks/linear.py", ["--device", "cuda", "--ms", "1,16,128,1024", "--seconds", "0.2"], 90),
    ("benchmarks/load_quantize.py", ["--device", "cuda", "--small", "--repeat", "1", "--rows", "bf16", "qf-w8a16",
                                     "qf-w8a8", "convert-w8a8", "pre-w8a8"], 110),
)

_PROBE = """
import json, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
except Exception as exc:
    info["error"] = f"{sys.executable} cannot import torch: {type(exc).__name__}: {exc}"
else:
    info["torch"] = torch.__version__
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["cuda_version"] = torch.version.cuda
    for name in ("transformers", "huggingface_hub", "pytest"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:
            info[name] = f"missing ({type(exc).__name__})"
print(json.dumps(info))
"""


@dataclass
class Step:
    """What one child process did: exit code (None if it was killed at its timeout), seconds, output lines."""

    name: str
    returncode: int | None = None
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # a step killed at its timeout still leaves what it printed
    return env


def _run(name: str, cmd: list[str], timeout: float, *, echo: bool) -> Step:
    """Run `cmd` in its own process group, keep its output (and echo it live if `echo`), kill the whole group at
    `timeout` seconds (SIGTERM, then SIGKILL 5 s later)."""
    step = Step(name)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            step.lines.append(line.rstrip("\n"))
            if echo:
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        step.returncode = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    step.seconds = time.monotonic() - start
    return step


def _nvidia_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _probe(timeout: float) -> tuple[dict, str | None]:
    """The stack's versions and whether CUDA works, from a child python (a hung CUDA init cannot hang the check)."""
    step = _run("probe", [sys.executable, "-c", _PROBE], timeout, echo=False)
    if step.timed_out:
        return {}, f"importing torch and initializing CUDA took over {timeout:.0f} s"
    try:
        return json.loads(step.lines[-1]), None
    except (IndexError, json.JSONDecodeError):
        return {}, "the probe printed no result: " + " / ".join(step.lines[-3:])


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")
_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?$")


def _test_counts(step: Step) -> dict[str, int]:
    """pytest's closing counts; for a run killed before its closing line, the outcomes its progress lines show."""
    for line in reversed(step.lines):
        if re.search(r" in [\d.]+s", line) and _COUNT.search(line):
            counts = {kind.rstrip("s") if kind.startswith(("error", "warning")) else kind: int(n)
                      for n, kind in _COUNT.findall(line)}
            return counts
    seen = "".join(m.group(1) for line in step.lines if (m := _PROGRESS.match(line.strip())))
    names = {".": "passed", "F": "failed", "E": "error", "s": "skipped", "x": "xfailed", "X": "xpassed"}
    counts: dict[str, int] = {}
    for char in seen:
        counts[names[char]] = counts.get(names[char], 0) + 1
    return counts


def _run_tests(timeout: float) -> tuple[Step, list[str], bool]:
    """The cuda tests; returns the step, summary lines, and whether they passed."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE", "tests"]
    step = _run("tests", cmd, timeout, echo=True)
    counts = _test_counts(step)
    shown = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no counts"
    failures = [line for line in step.lines if line.startswith(("FAILED ", "ERROR "))]
    if step.timed_out:
        status, ok = f"TIMED OUT after {step.seconds:.0f} s (limit {timeout:.0f} s); outcomes seen: {shown}", False
    elif step.returncode == 5:
        status, ok = "no cuda-marked test was collected", False
    else:
        bad = counts.get("failed", 0) + counts.get("error", 0)
        ok = step.returncode == 0 and bad == 0
        status = f"{shown} in {step.seconds:.0f} s" + ("" if ok else f" (pytest exit {step.returncode})")
    if not counts.get("passed") and ok:
        status += " -- nothing passed: every cuda test was skipped"
        ok = False
    lines = [f"tests (pytest -m cuda): {status}"] + [f"  {line}" for line in failures[:40]]
    if len(failures) > 40:
        lines.append(f"  ... and {len(failures) - 40} more")
    return step, lines, ok


def _run_bench(script: str, args: list[str], timeout: float) -> tuple[list[str], bool]:
    """One benchmark's CUDA rows; returns summary lines (its table) and whether every qformat row ran."""
    step = _run("bench", [sys.executable, script, *args], timeout, echo=False)
    table = [line for line in step.lines if line.startswith(("|", "torch ", "qformat rows that failed"))]
    if step.timed_out:
        head, ok = f"TIMED OUT after {step.seconds:.0f} s (limit {timeout:.0f} s); the rows it finished:", False
    elif step.returncode == 0:
        head, ok = f"ok in {step.seconds:.0f} s", True
    else:
        head, ok = f"FAILED (exit {step.returncode}) after {step.seconds:.0f} s", False
        if not any(line.startswith("qformat rows that failed") for line in table):
            table += ["  last output:"] + [f"  {line}" for line in step.lines[-15:]]
    return [f"benchmark ({script} {' '.join(args)}): {head}"] + [f"  {line}" for line in table], ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--tests-only", action="store_true", help="skip the benchmark")
    only.add_argument("--bench-only", action="store_true", help="skip the tests")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + TOTAL_SECONDS

    info, problem = _probe(PROBE_SECONDS)
    if problem is None and not info.get("cuda"):
        problem = info.get("error") or f"torch {info.get('torch')} sees no CUDA device"
    if problem is not None:
        if _nvidia_present():
            print(f"gpu-check: FAILED: this machine has an NVIDIA device but {problem}")
            return 1
        print(f"gpu-check: no CUDA ({problem}); nothing run")
        return 0

    summary = [
        f"device: {info['device']} (compute capability {info['capability']}), CUDA {info['cuda_version']}",
        f"stack: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"huggingface_hub {info['huggingface_hub']}, pytest {info['pytest']}",
    ]
    ok = True
    if not args.bench_only:
        left = deadline - time.monotonic() - (0 if args.tests_only else BENCH_RESERVE)
        _, lines, tests_ok = _run_tests(min(TESTS_SECONDS, left))
        summary += lines
        ok &= tests_ok
    if not args.tests_only:
        for script, bench_args, seconds in BENCHMARKS:
            lines, bench_ok = _run_bench(script, bench_args, min(seconds, deadline - time.monotonic()))
            summary += lines
            ok &= bench_ok
    bar = "=" * 40
    print(f"\n{bar} gpu-check summary {bar}")
    print("\n".join(summary))
    print(f"result: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
